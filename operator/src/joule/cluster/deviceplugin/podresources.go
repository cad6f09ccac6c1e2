package main

// `joule-device-plugin pod-resources`: asks a kubelet's pod-resources API
// (k8s.io/kubelet/pkg/apis/podresources/v1, PodResourcesLister) which devices each pod's
// containers hold (List) and which the node can hand out (GetAllocatableResources), and
// prints both as JSON. It is how Joule checks, as a monitoring agent on a GPU node would,
// that the slots a pod was given are the ones the kubelet accounts to it.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"
)

const (
	// DefaultPodResourcesSocket is where a kubelet with the default --root-dir serves the API;
	// the kubelet puts it at <root-dir>/pod-resources/kubelet.sock.
	DefaultPodResourcesSocket = "/var/lib/kubelet/pod-resources/kubelet.sock"
	// The kubelet's own pod-resources client allows responses this large (many pods).
	podResourcesMaxMsgSize = 16 * 1024 * 1024
	// Unix socket paths longer than this do not fit in sockaddr_un.
	maxSocketPath = 107
)

// PodResourcesReport is what `pod-resources` prints.
type PodResourcesReport struct {
	Socket string       `json:"socket"`
	Pods   []PodDevices `json:"pods"`
	// Allocatable maps a resource name to the device IDs the node has for it.
	Allocatable map[string][]string `json:"allocatable"`
}

// PodDevices is one pod the kubelet lists, with its containers.
type PodDevices struct {
	Namespace  string             `json:"namespace"`
	Name       string             `json:"name"`
	Containers []ContainerDevices `json:"containers"`
}

// ContainerDevices maps a resource name to the device IDs one container holds.
type ContainerDevices struct {
	Name    string              `json:"name"`
	Devices map[string][]string `json:"devices"`
}

// podResourcesMain runs the subcommand with args (those after "pod-resources"); it returns the
// exit status: 0, 1 when the kubelet could not be asked, 2 for bad arguments.
func podResourcesMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("joule-device-plugin pod-resources", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", DefaultPodResourcesSocket,
		"the kubelet's pod-resources socket: <kubelet --root-dir>/pod-resources/kubelet.sock")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for the kubelet's answers")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: joule-device-plugin pod-resources [--socket PATH] [--timeout D]\n\n"+
			"Prints, as JSON, the devices the kubelet accounts to each pod (List) and the\n"+
			"devices the node can allocate (GetAllocatableResources).\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "joule-device-plugin pod-resources: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if *timeout <= 0 {
		fmt.Fprintf(stderr, "joule-device-plugin pod-resources: --timeout must be positive, got %v\n", *timeout)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	report, err := queryPodResources(ctx, *socket)
	if err != nil {
		fmt.Fprintf(stderr, "joule-device-plugin pod-resources: %v\n", err)
		return 1
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(report); err != nil {
		fmt.Fprintf(stderr, "joule-device-plugin pod-resources: %v\n", err)
		return 1
	}
	return 0
}

// queryPodResources asks the kubelet on socket for List and GetAllocatableResources.
func queryPodResources(ctx context.Context, socket string) (*PodResourcesReport, error) {
	if len(socket) > maxSocketPath {
		return nil, fmt.Errorf("socket path %s is %d bytes, more than a unix socket allows (%d)",
			socket, len(socket), maxSocketPath)
	}
	if _, err := os.Stat(socket); err != nil {
		return nil, fmt.Errorf("no pod-resources socket (is the kubelet running, with this --root-dir?): %w", err)
	}
	conn, err := grpc.NewClient("unix://"+socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(podResourcesMaxMsgSize)))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	client := podresourcesv1.NewPodResourcesListerClient(conn)
	listed, err := client.List(ctx, &podresourcesv1.ListPodResourcesRequest{})
	if err != nil {
		return nil, fmt.Errorf("List on %s: %w", socket, err)
	}
	allocatable, err := client.GetAllocatableResources(ctx, &podresourcesv1.AllocatableResourcesRequest{})
	if err != nil {
		return nil, fmt.Errorf("GetAllocatableResources on %s: %w", socket, err)
	}
	return buildReport(socket, listed, allocatable), nil
}

// buildReport turns the kubelet's answers into the printed form: pods sorted by namespace and
// name, containers in the kubelet's order, and each resource's IDs merged (the kubelet sends
// one entry per resource and NUMA placement) in the order it gave them.
func buildReport(socket string, listed *podresourcesv1.ListPodResourcesResponse,
	allocatable *podresourcesv1.AllocatableResourcesResponse) *PodResourcesReport {
	report := &PodResourcesReport{
		Socket:      socket,
		Pods:        []PodDevices{},
		Allocatable: devicesByResource(allocatable.GetDevices()),
	}
	for _, pod := range listed.GetPodResources() {
		pd := PodDevices{Namespace: pod.GetNamespace(), Name: pod.GetName(), Containers: []ContainerDevices{}}
		for _, c := range pod.GetContainers() {
			pd.Containers = append(pd.Containers, ContainerDevices{
				Name:    c.GetName(),
				Devices: devicesByResource(c.GetDevices()),
			})
		}
		report.Pods = append(report.Pods, pd)
	}
	sort.Slice(report.Pods, func(i, j int) bool {
		a, b := report.Pods[i], report.Pods[j]
		if a.Namespace != b.Namespace {
			return a.Namespace < b.Namespace
		}
		return a.Name < b.Name
	})
	return report
}

func devicesByResource(devices []*podresourcesv1.ContainerDevices) map[string][]string {
	out := map[string][]string{}
	for _, d := range devices {
		name := d.GetResourceName()
		if out[name] == nil {
			out[name] = []string{}
		}
		out[name] = append(out[name], d.GetDeviceIds()...)
	}
	return out
}
