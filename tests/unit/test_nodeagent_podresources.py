"""The pod-resources client: its wire-format decoding, against messages encoded here by hand
(every wire type, unknown fields at every level, packed and unpacked repeated scalars, nested
messages), and the client against an in-process gRPC server on a unix socket."""

from __future__ import annotations

import contextlib
import itertools
import socket as sockets
import struct
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from joule.nodeagent.podresources import (
    ALLOCATABLE_METHOD,
    LIST_METHOD,
    MAX_RESPONSE_BYTES,
    ContainerDevices,
    PodDevices,
    PodResourcesClient,
    PodResourcesError,
    decode_allocatable,
    decode_list,
    gpu_id,
)

GPU = "nvidia.com/gpu"

# A tiny protobuf encoder: field records of each wire type.


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s are ten bytes of two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def vint(number: int, n: int) -> bytes:
    return key(number, 0) + varint(n)


def fixed64(number: int, n: int) -> bytes:
    return key(number, 1) + struct.pack("<q", n)


def ld(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def text(number: int, value: str) -> bytes:
    return ld(number, value.encode())


def group(number: int, body: bytes) -> bytes:
    return key(number, 3) + body + key(number, 4)


def fixed32(number: int, n: int) -> bytes:
    return key(number, 5) + struct.pack("<i", n)


# Fields no decoder here knows, one of each wire type (a group holding a nested group).
UNKNOWN = (
    vint(99, 2**63)
    + fixed64(100, -1)
    + ld(101, b"\xff\x00 not a message")
    + group(102, vint(1, 7) + group(2, text(1, "x")) + fixed32(3, 5))
    + fixed32(103, 42)
)

# The kubelet's messages (k8s.io/kubelet pkg/apis/podresources/v1/api.proto).


def topology(*numa: int) -> bytes:  # TopologyInfo{repeated NUMANode nodes = 1}
    return b"".join(ld(1, vint(1, n)) for n in numa)  # NUMANode{int64 ID = 1}


def devices(resource: str, ids: list[str], numa: tuple[int, ...] = (), extra: bytes = b"") -> bytes:
    # ContainerDevices{string resource_name = 1; repeated string device_ids = 2;
    # TopologyInfo topology = 3}
    body = text(1, resource) + b"".join(text(2, i) for i in ids)
    return body + (ld(3, topology(*numa)) if numa else b"") + extra


def memory(kind: str, size: int) -> bytes:
    # ContainerMemory{string memory_type = 1; uint64 size = 2; TopologyInfo topology = 3}
    return text(1, kind) + vint(2, size) + ld(3, topology(0))


def cpu_ids_packed(number: int, ids: list[int]) -> bytes:
    return ld(number, b"".join(varint(i) for i in ids))


def cpu_ids_unpacked(number: int, ids: list[int]) -> bytes:
    return b"".join(vint(number, i) for i in ids)


def dynamic_resource() -> bytes:
    # DynamicResource{claim_name = 2; claim_namespace = 3; repeated ClaimResource
    # claim_resources = 4}; ClaimResource{repeated CDIDevice cdi_devices = 1; driver_name = 2}
    claim = ld(1, text(1, "vendor.com/gpu=0")) + text(2, "gpu.vendor.com")
    return text(2, "claim") + text(3, "ns") + ld(4, claim)


def container(name: str, *device_entries: bytes, extra: bytes = b"") -> bytes:
    # ContainerResources{string name = 1; repeated ContainerDevices devices = 2;
    # repeated int64 cpu_ids = 3; repeated ContainerMemory memory = 4;
    # repeated DynamicResource dynamic_resources = 5}
    return text(1, name) + b"".join(ld(2, d) for d in device_entries) + extra


def pod(namespace: str, name: str, *containers: bytes, extra: bytes = b"") -> bytes:
    # PodResources{string name = 1; string namespace = 2; repeated ContainerResources
    # containers = 3}
    return text(1, name) + text(2, namespace) + b"".join(ld(3, c) for c in containers) + extra


def list_response(*pods: bytes) -> bytes:  # ListPodResourcesResponse{pod_resources = 1}
    return b"".join(ld(1, p) for p in pods)


def allocatable_response(*entries: bytes, extra: bytes = b"") -> bytes:
    # AllocatableResourcesResponse{repeated ContainerDevices devices = 1;
    # repeated int64 cpu_ids = 2; repeated ContainerMemory memory = 3}
    return b"".join(ld(1, e) for e in entries) + extra


# A node's answer, as a kubelet with CPU and memory managers would send it.
TRAINER = pod(
    "team-a",
    "trainer-0",
    container(
        "trainer",
        devices(GPU, ["GPU-aaa::0", "GPU-aaa::1"], numa=(0,), extra=UNKNOWN),
        devices("example.com/nic", ["nic-0"]),
        devices(GPU, ["GPU-bbb::0"], numa=(1,)),
        extra=cpu_ids_packed(3, [0, 1, 2, 300])
        + cpu_ids_unpacked(3, [4, -1])
        + ld(4, memory("memory", 2**40))
        + ld(5, dynamic_resource())
        + UNKNOWN,
    ),
    container("sidecar", extra=cpu_ids_unpacked(3, [5])),
    container("metrics", devices(GPU, ["GPU-aaa::0"])),
    extra=UNKNOWN,
)
IDLE = pod("kube-system", "coredns-1", container("coredns"))
LIST = list_response(TRAINER, IDLE) + UNKNOWN

TRAINER_POD = PodDevices(
    namespace="team-a",
    name="trainer-0",
    containers=(
        ContainerDevices(
            "trainer",
            {GPU: ("GPU-aaa::0", "GPU-aaa::1", "GPU-bbb::0"), "example.com/nic": ("nic-0",)},
        ),
        ContainerDevices("sidecar", {}),
        ContainerDevices("metrics", {GPU: ("GPU-aaa::0",)}),
    ),
)
IDLE_POD = PodDevices("kube-system", "coredns-1", (ContainerDevices("coredns"),))


def test_gpu_id_strips_a_sharing_replica_suffix() -> None:
    assert gpu_id("GPU-abc::1") == "GPU-abc"
    assert gpu_id("GPU-abc::12") == "GPU-abc"
    assert gpu_id("GPU-abc") == "GPU-abc"
    assert gpu_id("MIG-4f2e8a3c-0f7c-5b6e-9d1a-2b3c4d5e6f70") == (
        "MIG-4f2e8a3c-0f7c-5b6e-9d1a-2b3c4d5e6f70"
    )
    assert gpu_id("slot-3") == "slot-3"
    # Only a number after the separator is a replica.
    assert gpu_id("weird::name") == "weird::name"
    assert gpu_id("GPU-abc::") == "GPU-abc::"
    assert gpu_id("GPU-abc::²") == "GPU-abc::²"


def test_a_node_s_pods_with_every_other_field_skipped() -> None:
    assert decode_list(LIST) == [TRAINER_POD, IDLE_POD]


def test_device_ids_are_every_container_s_in_order_each_once() -> None:
    assert TRAINER_POD.device_ids(GPU) == ("GPU-aaa::0", "GPU-aaa::1", "GPU-bbb::0")
    assert TRAINER_POD.device_ids("example.com/nic") == ("nic-0",)
    assert TRAINER_POD.device_ids("example.com/fpga") == ()
    assert IDLE_POD.device_ids(GPU) == ()
    gpus = dict.fromkeys(gpu_id(i) for i in TRAINER_POD.device_ids(GPU))
    assert list(gpus) == ["GPU-aaa", "GPU-bbb"]


def test_allocatable_merges_a_resource_s_entries_in_order() -> None:
    data = allocatable_response(
        devices(GPU, ["GPU-aaa::0", "GPU-aaa::1"], numa=(0,)),
        devices("example.com/nic", ["nic-0"], extra=UNKNOWN),
        devices(GPU, ["GPU-bbb::0"], numa=(1,)),
        extra=cpu_ids_packed(2, [0, 1])
        + cpu_ids_unpacked(2, [2])
        + ld(3, memory("hugepages-2Mi", 0))
        + UNKNOWN,
    )
    assert decode_allocatable(data) == {
        GPU: ("GPU-aaa::0", "GPU-aaa::1", "GPU-bbb::0"),
        "example.com/nic": ("nic-0",),
    }


def test_empty_answers() -> None:
    assert decode_list(b"") == []
    assert decode_allocatable(b"") == {}
    assert decode_list(UNKNOWN) == []
    assert decode_allocatable(cpu_ids_packed(2, [0, 1])) == {}
    # A pod message with nothing set (proto3 leaves out empty strings).
    assert decode_list(ld(1, b"")) == [PodDevices("", "", ())]


def test_the_last_of_a_repeated_singular_field_wins() -> None:
    data = list_response(text(1, "old") + text(2, "ns") + text(1, "new"))
    assert decode_list(data) == [PodDevices("ns", "new", ())]


def test_a_known_field_with_another_wire_type_is_skipped() -> None:
    # protobuf-go keeps such a field as unknown; so do we.
    data = list_response(vint(1, 5) + text(2, "ns") + fixed32(3, 1) + text(1, "p"))
    assert decode_list(data) == [PodDevices("ns", "p", ())]
    assert decode_list(vint(1, 3)) == []


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (LIST[:-1], "byte"),  # the last unknown field cut short
        (ld(1, TRAINER)[:20], "needs"),  # a length longer than what is left
        (key(1, 2), "truncated varint"),  # a length that is not there
        (b"\x80", "truncated varint"),  # a key cut short
        (key(5, 0) + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (key(7, 1) + b"\x00" * 7, "truncated"),  # fixed64 needs 8 bytes
        (key(7, 5) + b"\x00" * 3, "truncated"),  # fixed32 needs 4
        (key(9, 3) + vint(1, 1), "not ended"),
        (key(9, 3) + key(8, 4), "ended by"),
        (key(9, 4), "end of group"),
        (key(9, 6) + b"\x00", "wire type 6"),
        (key(9, 7) + b"\x00", "wire type 7"),
        (b"\x00", "field number 0"),
        (list_response(text(1, "ns") + ld(2, b"\xff\xfe")), "not UTF-8"),
        (list_response(pod("ns", "p", container("c", b"\x12\x05ab"))), "needs"),
        (key(1, 3) * 101 + key(1, 4) * 101, "deep"),
    ],
)
def test_malformed_messages_are_value_errors(data: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        decode_list(data)


def test_a_malformed_allocatable_answer_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        decode_allocatable(allocatable_response(text(1, GPU) + ld(2, b"GPU-\xe9")))
    with pytest.raises(ValueError, match="needs"):
        decode_allocatable(allocatable_response(devices(GPU, ["GPU-aaa"]))[:-1])


def test_container_devices_are_read_only_hashable_values() -> None:
    given_devices = {GPU: ("GPU-aaa",)}
    c = ContainerDevices("trainer", given_devices)
    given_devices[GPU] = ()
    assert c.devices == {GPU: ("GPU-aaa",)}
    with pytest.raises(TypeError):
        c.devices[GPU] = ()  # type: ignore[index]
    assert c == ContainerDevices("trainer", {GPU: ("GPU-aaa",)})
    assert c != ContainerDevices("trainer", {GPU: ("GPU-bbb",)})
    assert len({c, ContainerDevices("trainer", {GPU: ("GPU-aaa",)}), TRAINER_POD.containers[0]})
    assert hash(TRAINER_POD) == hash(decode_list(LIST)[0])


# Round trips: whatever pods, however the kubelet splits a resource's IDs into entries.

names = st.text(max_size=12)
ids = st.lists(st.text(min_size=1, max_size=12), max_size=5).map(tuple)
containers = st.builds(
    ContainerDevices, names, st.dictionaries(st.text(max_size=16), ids, max_size=3)
)
pods = st.builds(PodDevices, names, names, st.lists(containers, max_size=3).map(tuple))
pod_noise = st.sampled_from([b"", UNKNOWN])  # fields no PodResources or response has
container_noise = st.sampled_from(  # fields a ContainerResources has and the decoder skips
    [b"", UNKNOWN, cpu_ids_packed(3, [1, 2]), cpu_ids_unpacked(3, [-7]), ld(5, dynamic_resource())]
)


def encode_entries(draw: st.DrawFn, devices_: dict[str, tuple[str, ...]]) -> list[bytes]:
    entries: list[bytes] = []
    for resource, its_ids in devices_.items():
        cuts = sorted(draw(st.lists(st.integers(0, len(its_ids)), max_size=2)))
        bounds = [0, *cuts, len(its_ids)]
        for start, end in itertools.pairwise(bounds):
            noise = draw(st.sampled_from([b"", UNKNOWN, ld(3, topology(0, 1))]))
            entries.append(devices(resource, list(its_ids[start:end]), extra=noise))
    return entries


@st.composite
def encoded_pods(draw: st.DrawFn) -> tuple[list[PodDevices], bytes]:
    value = draw(st.lists(pods, max_size=4))
    messages = []
    for p in value:
        encoded = [
            container(c.name, *encode_entries(draw, dict(c.devices)), extra=draw(container_noise))
            for c in p.containers
        ]
        messages.append(pod(p.namespace, p.name, *encoded, extra=draw(pod_noise)))
    return value, list_response(*messages) + draw(pod_noise)


@given(encoded_pods())
@settings(max_examples=200, deadline=None)
def test_decode_list_reads_back_what_was_encoded(case: tuple[list[PodDevices], bytes]) -> None:
    value, data = case
    assert decode_list(data) == value


@given(st.data(), st.dictionaries(st.text(max_size=16), ids, max_size=4))
@settings(max_examples=200, deadline=None)
def test_decode_allocatable_reads_back_what_was_encoded(
    data: st.DataObject, value: dict[str, tuple[str, ...]]
) -> None:
    encoded = allocatable_response(*encode_entries(data.draw, value))
    assert decode_allocatable(encoded) == value


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_any_bytes_decode_or_raise_value_error(data: bytes) -> None:
    for decode in (decode_list, decode_allocatable):
        with contextlib.suppress(ValueError):
            decode(data)


@given(st.integers(0, len(LIST) - 1))
def test_every_cut_of_a_message_decodes_or_raises_value_error(cut: int) -> None:
    with contextlib.suppress(ValueError):
        decode_list(LIST[:cut])


# The client, against a fake kubelet: a gRPC server that answers with fixed bytes.


class FakeKubelet:
    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.answers: dict[str, bytes | grpc.StatusCode] = {}
        self.requests: list[tuple[str, bytes]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handlers = {
            method.rsplit("/", 1)[-1]: grpc.unary_unary_rpc_method_handler(self._answer(method))
            for method in (LIST_METHOD, ALLOCATABLE_METHOD)
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("v1.PodResourcesLister", handlers),)
        )
        self.server.add_insecure_port(f"unix://{socket}")

    def _answer(self, method: str):
        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.requests.append((method, request))
            reply = self.answers.get(method, b"")
            if isinstance(reply, grpc.StatusCode):
                context.abort(reply, "the fake kubelet says no")
            return reply

        return answer


@pytest.fixture
def folder() -> Iterator[Path]:
    # Short: a unix socket's path must fit in 107 bytes, and pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="podres-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def kubelet(folder: Path) -> Iterator[FakeKubelet]:
    fake = FakeKubelet(folder / "kubelet.sock")
    fake.server.start()
    yield fake
    fake.server.stop(grace=None)


def test_the_client_asks_with_empty_requests_and_decodes_the_answers(
    kubelet: FakeKubelet,
) -> None:
    kubelet.answers[LIST_METHOD] = LIST
    kubelet.answers[ALLOCATABLE_METHOD] = allocatable_response(devices(GPU, ["GPU-aaa::0"]))
    with PodResourcesClient(kubelet.socket) as client:
        assert client.list() == [TRAINER_POD, IDLE_POD]
        assert client.allocatable() == {GPU: ("GPU-aaa::0",)}
    assert kubelet.requests == [(LIST_METHOD, b""), (ALLOCATABLE_METHOD, b"")]


def test_a_grpc_error_names_the_socket_the_method_and_the_status(kubelet: FakeKubelet) -> None:
    kubelet.answers[ALLOCATABLE_METHOD] = grpc.StatusCode.PERMISSION_DENIED
    with PodResourcesClient(kubelet.socket) as client, pytest.raises(PodResourcesError) as e:
        client.allocatable()
    assert str(e.value) == (
        f"could not ask the kubelet at {kubelet.socket} (GetAllocatableResources): "
        "PERMISSION_DENIED (the fake kubelet says no)"
    )
    assert isinstance(e.value.__cause__, grpc.RpcError)


def test_a_malformed_answer_is_a_pod_resources_error(kubelet: FakeKubelet) -> None:
    kubelet.answers[LIST_METHOD] = LIST[:-1]
    with PodResourcesClient(kubelet.socket) as client, pytest.raises(PodResourcesError) as e:
        client.list()
    assert f"the kubelet at {kubelet.socket} sent a malformed List answer" in str(e.value)
    assert isinstance(e.value.__cause__, ValueError)


def test_answers_are_bounded_at_16_mib(kubelet: FakeKubelet) -> None:
    kubelet.answers[LIST_METHOD] = list_response(pod("ns", "big")) + ld(
        9, b"x" * MAX_RESPONSE_BYTES
    )
    kubelet.answers[ALLOCATABLE_METHOD] = ld(9, b"x" * (MAX_RESPONSE_BYTES - 8))  # gRPC's 4 MiB
    with PodResourcesClient(kubelet.socket) as client:
        with pytest.raises(PodResourcesError, match="RESOURCE_EXHAUSTED"):
            client.list()
        assert client.allocatable() == {}


def test_a_missing_socket_fails_at_once_with_a_hint(folder: Path) -> None:
    socket = folder / "pod-resources" / "kubelet.sock"
    started = time.monotonic()
    with PodResourcesClient(socket, timeout_s=30) as client, pytest.raises(PodResourcesError) as e:
        client.list()
    assert time.monotonic() - started < 5  # not the 30 s timeout
    message = str(e.value)
    assert message.startswith(f"could not ask the kubelet at {socket} (List): UNAVAILABLE (")
    assert "is the kubelet running, and its pod-resources folder mounted?" in message


def test_a_silent_socket_fails_after_the_timeout(folder: Path) -> None:
    path = folder / "kubelet.sock"
    with sockets.socket(sockets.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        with (
            PodResourcesClient(path, timeout_s=0.3) as client,
            pytest.raises(PodResourcesError, match=r"\(List\): DEADLINE_EXCEEDED"),
        ):
            client.list()


def test_the_target_is_the_socket_s_absolute_path(
    kubelet: FakeKubelet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(kubelet.socket.parent)
    with PodResourcesClient(Path("kubelet.sock")) as client:
        assert client.socket == kubelet.socket
        assert client.list() == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="longer than a unix socket allows"):
        PodResourcesClient(Path("/tmp") / ("x" * 100) / "kubelet.sock")
    with pytest.raises(ValueError, match="positive"):
        PodResourcesClient(Path("/tmp/kubelet.sock"), timeout_s=0)
