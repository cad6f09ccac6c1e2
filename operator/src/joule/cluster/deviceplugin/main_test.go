package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	v1beta1 "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// fakeKubelet is the kubelet's Registration service, in-process, on <dir>/kubelet.sock.
type fakeKubelet struct {
	v1beta1.UnimplementedRegistrationServer
	server   *grpc.Server
	requests chan *v1beta1.RegisterRequest
}

func startFakeKubelet(t *testing.T, dir string) *fakeKubelet {
	t.Helper()
	path := filepath.Join(dir, "kubelet.sock")
	_ = os.Remove(path)
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("listening on %s: %v", path, err)
	}
	k := &fakeKubelet{server: grpc.NewServer(), requests: make(chan *v1beta1.RegisterRequest, 8)}
	v1beta1.RegisterRegistrationServer(k.server, k)
	go func() { _ = k.server.Serve(lis) }()
	t.Cleanup(k.server.Stop)
	return k
}

func (k *fakeKubelet) Register(_ context.Context, req *v1beta1.RegisterRequest) (*v1beta1.Empty, error) {
	k.requests <- req
	return &v1beta1.Empty{}, nil
}

func (k *fakeKubelet) next(t *testing.T) *v1beta1.RegisterRequest {
	t.Helper()
	select {
	case req := <-k.requests:
		return req
	case <-time.After(10 * time.Second):
		t.Fatal("the plugin did not register within 10s")
		return nil
	}
}

func dialPlugin(t *testing.T, path string) v1beta1.DevicePluginClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return v1beta1.NewDevicePluginClient(conn)
}

func listDevices(t *testing.T, client v1beta1.DevicePluginClient) []*v1beta1.Device {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := client.ListAndWatch(ctx, &v1beta1.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetDevices()
}

func startPlugin(t *testing.T, dir string, count int) (context.CancelFunc, <-chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cfg := config{resource: "nvidia.com/gpu", count: count, socketDir: dir, poll: 20 * time.Millisecond}
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg, t.Logf) }()
	t.Cleanup(cancel)
	return cancel, done
}

func shortTempDir(t *testing.T) string {
	t.Helper()
	// Unix socket paths are limited to 108 bytes; t.TempDir() can be longer than that.
	dir, err := os.MkdirTemp("", "jdp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestRegistersListsAndAllocates(t *testing.T) {
	dir := shortTempDir(t)
	kubelet := startFakeKubelet(t, dir)
	cancel, done := startPlugin(t, dir, 4)

	req := kubelet.next(t)
	if req.GetResourceName() != "nvidia.com/gpu" || req.GetVersion() != v1beta1.Version {
		t.Fatalf("registered as %q (version %q)", req.GetResourceName(), req.GetVersion())
	}
	if req.GetEndpoint() != "joule-nvidia-com-gpu.sock" {
		t.Fatalf("endpoint %q", req.GetEndpoint())
	}
	sock := filepath.Join(dir, req.GetEndpoint())
	client := dialPlugin(t, sock)

	devices := listDevices(t, client)
	var ids []string
	for _, d := range devices {
		if d.GetHealth() != v1beta1.Healthy {
			t.Errorf("%s is %s", d.GetID(), d.GetHealth())
		}
		ids = append(ids, d.GetID())
	}
	if want := []string{"slot-0", "slot-1", "slot-2", "slot-3"}; !reflect.DeepEqual(ids, want) {
		t.Fatalf("devices %v, want %v", ids, want)
	}

	ctx := context.Background()
	alloc, err := client.Allocate(ctx, &v1beta1.AllocateRequest{ContainerRequests: []*v1beta1.ContainerAllocateRequest{
		{DevicesIds: []string{"slot-1", "slot-3"}},
		{DevicesIds: []string{"slot-0"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(alloc.GetContainerResponses()) != 2 {
		t.Fatalf("%d container responses", len(alloc.GetContainerResponses()))
	}
	want := map[string]string{"NVIDIA_VISIBLE_DEVICES": "slot-1,slot-3", "JOULE_GPU_SLOTS": "slot-1,slot-3"}
	if got := alloc.GetContainerResponses()[0].GetEnvs(); !reflect.DeepEqual(got, want) {
		t.Fatalf("envs %v, want %v", got, want)
	}
	if got := alloc.GetContainerResponses()[1].GetEnvs()["JOULE_GPU_SLOTS"]; got != "slot-0" {
		t.Fatalf("second container JOULE_GPU_SLOTS=%q", got)
	}
	if _, err := client.Allocate(ctx, &v1beta1.AllocateRequest{ContainerRequests: []*v1beta1.ContainerAllocateRequest{
		{DevicesIds: []string{"slot-9"}},
	}}); err == nil {
		t.Fatal("allocating an unknown slot succeeded")
	}

	pref, err := client.GetPreferredAllocation(ctx, &v1beta1.PreferredAllocationRequest{
		ContainerRequests: []*v1beta1.ContainerPreferredAllocationRequest{{
			AvailableDeviceIDs:   []string{"slot-3", "slot-2", "slot-0"},
			MustIncludeDeviceIDs: []string{"slot-3"},
			AllocationSize:       2,
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := pref.GetContainerResponses()[0].GetDeviceIDs(); !reflect.DeepEqual(got, []string{"slot-3", "slot-0"}) {
		t.Fatalf("preferred %v", got)
	}
	if _, err := client.PreStartContainer(ctx, &v1beta1.PreStartContainerRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.GetDevicePluginOptions(ctx, &v1beta1.Empty{}); err != nil {
		t.Fatal(err)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run returned %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after cancel")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket %s left behind (stat: %v)", sock, err)
	}
}

func TestRegistersAgainAfterKubeletRestart(t *testing.T) {
	dir := shortTempDir(t)
	first := startFakeKubelet(t, dir)
	_, _ = startPlugin(t, dir, 2)
	endpoint := first.next(t).GetEndpoint()

	// A kubelet restart: its socket goes away, it deletes every socket in the folder, and
	// listens on a new kubelet.sock.
	first.server.GracefulStop() // lets the first Register answer before the socket goes
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		_ = os.Remove(filepath.Join(dir, e.Name()))
	}
	second := startFakeKubelet(t, dir)
	req := second.next(t)
	if req.GetEndpoint() != endpoint || req.GetResourceName() != "nvidia.com/gpu" {
		t.Fatalf("re-registered as %q at %q", req.GetResourceName(), req.GetEndpoint())
	}
	if n := len(listDevices(t, dialPlugin(t, filepath.Join(dir, endpoint)))); n != 2 {
		t.Fatalf("%d devices after the restart", n)
	}
}

func TestConfigValidation(t *testing.T) {
	good := config{resource: "nvidia.com/gpu", count: 1, socketDir: "/x", poll: time.Second}
	if err := good.validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []config{
		{resource: "gpu", count: 1, socketDir: "/x", poll: time.Second},
		{resource: "nvidia.com/gpu", count: 0, socketDir: "/x", poll: time.Second},
		{resource: "nvidia.com/gpu", count: 1, socketDir: "", poll: time.Second},
	} {
		if err := bad.validate(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	if got := fmt.Sprint(slotIDs(3)); got != "[slot-0 slot-1 slot-2]" {
		t.Fatalf("slot IDs %s", got)
	}
}
