package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"
)

// fakeLister is the kubelet's PodResourcesLister service, in-process, answering canned data.
type fakeLister struct {
	podresourcesv1.UnimplementedPodResourcesListerServer
	list        *podresourcesv1.ListPodResourcesResponse
	allocatable *podresourcesv1.AllocatableResourcesResponse
	listErr     error
}

func (f *fakeLister) List(context.Context, *podresourcesv1.ListPodResourcesRequest) (*podresourcesv1.ListPodResourcesResponse, error) {
	return f.list, f.listErr
}

func (f *fakeLister) GetAllocatableResources(context.Context, *podresourcesv1.AllocatableResourcesRequest) (*podresourcesv1.AllocatableResourcesResponse, error) {
	return f.allocatable, nil
}

func startFakeLister(t *testing.T, f *fakeLister) string {
	t.Helper()
	path := filepath.Join(shortTempDir(t), "kubelet.sock")
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	podresourcesv1.RegisterPodResourcesListerServer(server, f)
	go func() { _ = server.Serve(lis) }()
	t.Cleanup(server.Stop)
	return path
}

func gpus(ids ...string) *podresourcesv1.ContainerDevices {
	return &podresourcesv1.ContainerDevices{ResourceName: "nvidia.com/gpu", DeviceIds: ids}
}

func runPodResources(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	rc := podResourcesMain(args, &stdout, &stderr)
	return rc, stdout.String(), stderr.String()
}

func TestPodResourcesPrintsPodsAndAllocatable(t *testing.T) {
	socket := startFakeLister(t, &fakeLister{
		list: &podresourcesv1.ListPodResourcesResponse{PodResources: []*podresourcesv1.PodResources{
			{Namespace: "ns-b", Name: "worker-0", Containers: []*podresourcesv1.ContainerResources{
				// The kubelet sends one entry per resource and NUMA placement: merged here.
				{Name: "trainer", Devices: []*podresourcesv1.ContainerDevices{gpus("slot-2"), gpus("slot-0")},
					CpuIds: []int64{1, 2}},
				{Name: "sidecar"},
			}},
			{Namespace: "ns-a", Name: "idle"},
		}},
		allocatable: &podresourcesv1.AllocatableResourcesResponse{
			Devices: []*podresourcesv1.ContainerDevices{gpus("slot-0", "slot-1"), gpus("slot-2", "slot-3")},
		},
	})

	rc, stdout, stderr := runPodResources(t, "--socket", socket)
	if rc != 0 {
		t.Fatalf("rc %d, stderr %s", rc, stderr)
	}
	var got PodResourcesReport
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, stdout)
	}
	want := PodResourcesReport{
		Socket: socket,
		Pods: []PodDevices{
			{Namespace: "ns-a", Name: "idle", Containers: []ContainerDevices{}},
			{Namespace: "ns-b", Name: "worker-0", Containers: []ContainerDevices{
				{Name: "trainer", Devices: map[string][]string{"nvidia.com/gpu": {"slot-2", "slot-0"}}},
				{Name: "sidecar", Devices: map[string][]string{}},
			}},
		},
		Allocatable: map[string][]string{"nvidia.com/gpu": {"slot-0", "slot-1", "slot-2", "slot-3"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
	// Empty collections print as [] and {}, never null, so callers can index them directly.
	if strings.Contains(stdout, "null") {
		t.Fatalf("null in output:\n%s", stdout)
	}
}

func TestPodResourcesEmptyNode(t *testing.T) {
	socket := startFakeLister(t, &fakeLister{
		list:        &podresourcesv1.ListPodResourcesResponse{},
		allocatable: &podresourcesv1.AllocatableResourcesResponse{},
	})
	rc, stdout, stderr := runPodResources(t, "--socket="+socket)
	if rc != 0 {
		t.Fatalf("rc %d, stderr %s", rc, stderr)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(stdout), &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got["pods"], []any{}) || !reflect.DeepEqual(got["allocatable"], map[string]any{}) {
		t.Fatalf("want empty pods and allocatable, got %s", stdout)
	}
}

func TestPodResourcesErrors(t *testing.T) {
	socket := startFakeLister(t, &fakeLister{listErr: status.Error(codes.Unavailable, "kubelet busy")})
	if rc, _, stderr := runPodResources(t, "--socket", socket); rc != 1 || !strings.Contains(stderr, "kubelet busy") {
		t.Fatalf("a failing List: rc %d, stderr %q", rc, stderr)
	}
	missing := filepath.Join(shortTempDir(t), "kubelet.sock")
	if rc, _, stderr := runPodResources(t, "--socket", missing); rc != 1 || !strings.Contains(stderr, "no pod-resources socket") {
		t.Fatalf("a missing socket: rc %d, stderr %q", rc, stderr)
	}
	long := "/" + strings.Repeat("x", 120) + "/kubelet.sock"
	if rc, _, stderr := runPodResources(t, "--socket", long); rc != 1 || !strings.Contains(stderr, "more than a unix socket allows") {
		t.Fatalf("a too-long path: rc %d, stderr %q", rc, stderr)
	}
	for _, args := range [][]string{{"--timeout=0s"}, {"extra"}, {"--nope"}} {
		if rc, _, _ := runPodResources(t, args...); rc != 2 {
			t.Fatalf("%v: rc %d, want 2", args, rc)
		}
	}
}
