// Command joule-device-plugin advertises GPU *slots* to a kubelet through the device-plugin API
// (k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1), so that pods asking for nvidia.com/gpu are
// scheduled, admitted and accounted for (the pod-resources API lists them) on a local node.
//
// These are slots, not GPUs. Nothing here looks at, opens or isolates any hardware: the
// plugin reports --count devices named slot-0..slot-N-1, all healthy, and Allocate hands a
// container the slots it got as environment variables:
//
//	NVIDIA_VISIBLE_DEVICES=slot-0,slot-3
//	JOULE_GPU_SLOTS=slot-0,slot-3
//
// NVIDIA_VISIBLE_DEVICES is set so that code reading it sees which slots it holds; with the
// NVIDIA container runtime configured as the default runtime, a slot name there is not a
// device it knows and the container would fail to start. Joule's local node runs plain runc.
//
// Lifecycle: the plugin serves on <socket-dir>/joule-<resource>.sock and registers with
// <socket-dir>/kubelet.sock. It polls the socket folder; when kubelet.sock is recreated (a
// kubelet restart, which also deletes every other socket there) or its own socket has gone,
// it serves afresh and registers again. SIGTERM or SIGINT stops it and removes its socket.
//
// `joule-device-plugin pod-resources [--socket PATH]` instead asks a kubelet's pod-resources
// API which devices each pod holds and which the node can allocate, and prints JSON
// (podresources.go).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	v1beta1 "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

const (
	// EnvVisibleDevices and EnvSlots carry the allocated slot IDs, comma-separated.
	EnvVisibleDevices = "NVIDIA_VISIBLE_DEVICES"
	EnvSlots          = "JOULE_GPU_SLOTS"
	registerTimeout   = 10 * time.Second
)

type config struct {
	resource  string
	count     int
	socketDir string
	poll      time.Duration
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "pod-resources" {
		os.Exit(podResourcesMain(os.Args[2:], os.Stdout, os.Stderr))
	}
	cfg := config{}
	flag.StringVar(&cfg.resource, "resource", "nvidia.com/gpu", "extended resource name to advertise")
	flag.IntVar(&cfg.count, "count", 8, "number of GPU slots (not GPUs) to advertise")
	flag.StringVar(&cfg.socketDir, "socket-dir", v1beta1.DevicePluginPath,
		"folder holding kubelet.sock; the plugin's own socket is created here")
	flag.DurationVar(&cfg.poll, "poll", 500*time.Millisecond,
		"how often to check whether kubelet.sock was recreated")
	flag.Parse()
	if err := cfg.validate(); err != nil {
		fmt.Fprintf(os.Stderr, "joule-device-plugin: %v\n", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	logger := log.New(os.Stderr, "joule-device-plugin: ", log.LstdFlags)
	if err := run(ctx, cfg, logger.Printf); err != nil {
		logger.Printf("%v", err)
		os.Exit(1)
	}
}

var resourceName = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`)

func (c config) validate() error {
	if !resourceName.MatchString(c.resource) {
		return fmt.Errorf("--resource %q must look like vendor.example/name", c.resource)
	}
	if c.count < 1 {
		return fmt.Errorf("--count must be at least 1, got %d", c.count)
	}
	if c.socketDir == "" {
		return errors.New("--socket-dir must not be empty")
	}
	if c.poll <= 0 {
		return fmt.Errorf("--poll must be positive, got %v", c.poll)
	}
	return nil
}

// socketName is the plugin's socket file name in the socket folder, derived from the resource.
func socketName(resource string) string {
	return "joule-" + strings.NewReplacer("/", "-", ".", "-").Replace(resource) + ".sock"
}

// slotIDs names count slots slot-0..slot-<count-1>.
func slotIDs(count int) []string {
	ids := make([]string, count)
	for i := range ids {
		ids[i] = fmt.Sprintf("slot-%d", i)
	}
	return ids
}

// plugin is the DevicePlugin service of one server instance.
type plugin struct {
	v1beta1.UnimplementedDevicePluginServer
	ids   []string
	known map[string]bool
	// done is closed when this instance stops, ending its ListAndWatch streams.
	done chan struct{}
}

func newPlugin(count int) *plugin {
	ids := slotIDs(count)
	known := make(map[string]bool, count)
	for _, id := range ids {
		known[id] = true
	}
	return &plugin{ids: ids, known: known, done: make(chan struct{})}
}

func (p *plugin) GetDevicePluginOptions(context.Context, *v1beta1.Empty) (*v1beta1.DevicePluginOptions, error) {
	return &v1beta1.DevicePluginOptions{GetPreferredAllocationAvailable: true}, nil
}

// ListAndWatch sends every slot, healthy, once; slots never change, so it then waits until the
// kubelet hangs up or this instance stops.
func (p *plugin) ListAndWatch(_ *v1beta1.Empty, stream v1beta1.DevicePlugin_ListAndWatchServer) error {
	devices := make([]*v1beta1.Device, len(p.ids))
	for i, id := range p.ids {
		devices[i] = &v1beta1.Device{ID: id, Health: v1beta1.Healthy}
	}
	if err := stream.Send(&v1beta1.ListAndWatchResponse{Devices: devices}); err != nil {
		return err
	}
	select {
	case <-stream.Context().Done():
	case <-p.done:
	}
	return nil
}

// GetPreferredAllocation prefers the lowest-numbered slots (after those that must be included).
func (p *plugin) GetPreferredAllocation(_ context.Context, req *v1beta1.PreferredAllocationRequest) (*v1beta1.PreferredAllocationResponse, error) {
	resp := &v1beta1.PreferredAllocationResponse{}
	for _, cr := range req.GetContainerRequests() {
		chosen := append([]string(nil), cr.GetMustIncludeDeviceIDs()...)
		taken := make(map[string]bool, len(chosen))
		for _, id := range chosen {
			taken[id] = true
		}
		available := make(map[string]bool, len(cr.GetAvailableDeviceIDs()))
		for _, id := range cr.GetAvailableDeviceIDs() {
			available[id] = true
		}
		for _, id := range p.ids {
			if len(chosen) >= int(cr.GetAllocationSize()) {
				break
			}
			if available[id] && !taken[id] {
				chosen = append(chosen, id)
				taken[id] = true
			}
		}
		resp.ContainerResponses = append(resp.ContainerResponses,
			&v1beta1.ContainerPreferredAllocationResponse{DeviceIDs: chosen})
	}
	return resp, nil
}

// Allocate gives each container its slot IDs as environment variables; nothing else.
func (p *plugin) Allocate(_ context.Context, req *v1beta1.AllocateRequest) (*v1beta1.AllocateResponse, error) {
	resp := &v1beta1.AllocateResponse{}
	for _, cr := range req.GetContainerRequests() {
		for _, id := range cr.GetDevicesIds() {
			if !p.known[id] {
				return nil, status.Errorf(codes.InvalidArgument, "unknown slot %q", id)
			}
		}
		slots := strings.Join(cr.GetDevicesIds(), ",")
		resp.ContainerResponses = append(resp.ContainerResponses, &v1beta1.ContainerAllocateResponse{
			Envs: map[string]string{EnvVisibleDevices: slots, EnvSlots: slots},
		})
	}
	return resp, nil
}

func (p *plugin) PreStartContainer(context.Context, *v1beta1.PreStartContainerRequest) (*v1beta1.PreStartContainerResponse, error) {
	return &v1beta1.PreStartContainerResponse{}, nil
}

// instance is one gRPC server on the plugin's socket.
type instance struct {
	plugin *plugin
	server *grpc.Server
	path   string
	id     fileID
	once   sync.Once
}

func serve(count int, path string) (*instance, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	id, err := statID(path)
	if err != nil {
		lis.Close()
		return nil, err
	}
	inst := &instance{plugin: newPlugin(count), server: grpc.NewServer(), path: path, id: id}
	v1beta1.RegisterDevicePluginServer(inst.server, inst.plugin)
	go func() { _ = inst.server.Serve(lis) }()
	return inst, nil
}

// stop ends the streams, stops the server and removes the socket if it is still ours.
func (i *instance) stop() {
	i.once.Do(func() {
		close(i.plugin.done)
		i.server.Stop()
		if id, err := statID(i.path); err == nil && id == i.id {
			_ = os.Remove(i.path)
		}
	})
}

func register(ctx context.Context, kubeletSocket, endpoint, resource string) error {
	conn, err := grpc.NewClient("unix://"+kubeletSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, registerTimeout)
	defer cancel()
	_, err = v1beta1.NewRegistrationClient(conn).Register(ctx, &v1beta1.RegisterRequest{
		Version:      v1beta1.Version,
		Endpoint:     endpoint,
		ResourceName: resource,
		Options:      &v1beta1.DevicePluginOptions{GetPreferredAllocationAvailable: true},
	})
	return err
}

// fileID tells a recreated file from the one seen before (a new inode or change time).
type fileID struct {
	dev, ino uint64
	ctime    int64
}

func statID(path string) (fileID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return fileID{}, err
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino, ctime: st.Ctim.Nano()}, nil
}

// run serves and registers whenever a kubelet is there, again after each kubelet restart,
// until ctx is cancelled; then it stops serving and removes its socket.
func run(ctx context.Context, cfg config, logf func(string, ...any)) error {
	if err := os.MkdirAll(cfg.socketDir, 0o750); err != nil {
		return err
	}
	endpoint := socketName(cfg.resource)
	path := filepath.Join(cfg.socketDir, endpoint)
	kubeletSocket := filepath.Join(cfg.socketDir, "kubelet.sock")
	var inst *instance
	defer func() {
		if inst != nil {
			inst.stop()
		}
	}()
	var registeredWith fileID
	registered := false
	lastErr := ""
	ticker := time.NewTicker(cfg.poll)
	defer ticker.Stop()
	logf("advertising %d slots of %s (slots, not GPUs); waiting for %s", cfg.count, cfg.resource, kubeletSocket)
	for {
		kubelet, kerr := statID(kubeletSocket)
		ours := inst != nil
		if ours {
			id, err := statID(path)
			ours = err == nil && id == inst.id
		}
		switch {
		case kerr != nil:
			if registered {
				logf("%s is gone; waiting for the kubelet to come back", kubeletSocket)
				registered = false
			}
		case !registered || kubelet != registeredWith || !ours:
			if registered {
				logf("kubelet restarted (or removed %s); registering again", path)
				registered = false
			}
			if !ours {
				// The kubelet deletes every socket in the folder when it starts.
				if inst != nil {
					inst.stop()
				}
				var err error
				if inst, err = serve(cfg.count, path); err != nil {
					return err
				}
			}
			if err := register(ctx, kubeletSocket, endpoint, cfg.resource); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				if msg := err.Error(); msg != lastErr {
					logf("registering with %s failed (will retry): %v", kubeletSocket, err)
					lastErr = msg
				}
			} else {
				registered, registeredWith, lastErr = true, kubelet, ""
				logf("registered %s with the kubelet, serving on %s", cfg.resource, path)
			}
		}
		select {
		case <-ctx.Done():
			logf("stopping; removing %s", path)
			return nil
		case <-ticker.C:
		}
	}
}
