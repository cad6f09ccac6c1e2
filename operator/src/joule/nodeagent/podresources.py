"""Which pod holds which GPU: a client for the kubelet's pod-resources API (v1).

The kubelet serves ``v1.PodResourcesLister`` (k8s.io/kubelet pkg/apis/podresources/v1,
api.proto) on a unix socket, ``<kubelet --root-dir>/pod-resources/kubelet.sock``; the node
agent's DaemonSet mounts that folder. ``List`` says which device IDs each pod's containers
were given, ``GetAllocatableResources`` which IDs the node can hand out. That is how the agent
joins NVML's per-GPU readings to pods.

No generated stubs and no protobuf: grpcio-tools' generated code pins the protobuf runtime's
version (and drags it into the agent's image), while the two requests are empty messages and
the fields read here are a few strings. So the requests go as ``b""`` through
``channel.unary_unary`` and the responses are read by a small wire-format decoder below,
which skips every other field (CPU IDs, memory, NUMA topology, dynamic resources, fields a
newer kubelet adds) by its wire type, as protobuf itself does. A known field sent with an
unexpected wire type is skipped too (protobuf-go keeps it as an unknown field).

``decode_list`` and ``decode_allocatable`` are pure (bytes in, values out, ``ValueError`` for
malformed bytes); ``PodResourcesClient`` is the I/O, and turns gRPC failures and malformed
answers into ``PodResourcesError``. The Go twin, used by the tests against a real kubelet, is
``joule.cluster.deviceplugin``'s ``pod-resources`` mode (deviceplugin/podresources.go).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TypeVar

import grpc

# Where a kubelet with the default --root-dir serves the API.
DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
# The kubelet's own pod-resources client accepts answers this large (a node with many pods);
# gRPC's default, 4 MiB, would be the first limit hit.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# After failed connects gRPC waits before trying again (1 s, growing 1.6x to 120 s) and fails
# calls at once meanwhile, so a kubelet back after minutes away would stay unasked for up to
# two minutes more (measured: 23 s after 90 s away; 2 s with this cap). Connecting to a local
# socket is cheap, so try at least every few seconds.
MAX_RECONNECT_BACKOFF_MS = 5_000
# Unix socket paths longer than this do not fit in sockaddr_un (gRPC only logs it, then fails
# every call with UNKNOWN).
MAX_SOCKET_PATH = 107
LIST_METHOD = "/v1.PodResourcesLister/List"
ALLOCATABLE_METHOD = "/v1.PodResourcesLister/GetAllocatableResources"
# The NVIDIA device plugin's time-slicing and MPS sharing advertise replica <n> of a GPU as
# "<GPU UUID>::<n>".
REPLICA_SEPARATOR = "::"

T = TypeVar("T")


@dataclass(frozen=True)
class ContainerDevices:
    """The devices one container holds: resource name -> device IDs, in the order of the
    kubelet's answer (its several entries for one resource, one per NUMA placement, merged).
    The kubelet keeps IDs in sets, so that order can differ from one answer to the next."""

    name: str
    # Read-only once made; left out of the hash (a mapping has none), still compared.
    devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", MappingProxyType(dict(self.devices)))


@dataclass(frozen=True)
class PodDevices:
    """One pod the kubelet lists (with or without devices), its containers in its order."""

    namespace: str
    name: str
    containers: tuple[ContainerDevices, ...] = ()

    def device_ids(self, resource: str) -> tuple[str, ...]:
        """Every container's IDs of ``resource``, in order, each once."""
        ids = (i for c in self.containers for i in c.devices.get(resource, ()))
        return tuple(dict.fromkeys(ids))


class PodResourcesError(RuntimeError):
    """The kubelet could not be asked, or answered with bytes that are not the message; the
    text names the socket and the gRPC status code and details (or what was malformed)."""


def gpu_id(device_id: str) -> str:
    """The GPU behind a device ID: a sharing replica's ``::<n>`` suffix removed
    (``"GPU-abc::1"`` -> ``"GPU-abc"``); any other ID as it is."""
    head, sep, replica = device_id.partition(REPLICA_SEPARATOR)
    if sep and replica.isascii() and replica.isdigit():
        return head
    return device_id


def decode_list(data: bytes) -> list[PodDevices]:
    """A ``ListPodResourcesResponse``'s pods, in the kubelet's (arbitrary) order."""
    return [_pod(value) for _, value in _known(data, 1)]


def decode_allocatable(data: bytes) -> dict[str, tuple[str, ...]]:
    """An ``AllocatableResourcesResponse``'s devices: resource name -> device IDs."""
    return _by_resource(_container_devices(value) for _, value in _known(data, 1))


class PodResourcesClient:
    """Asks one kubelet's pod-resources socket; each call waits at most ``timeout_s``.

    The channel connects on first use (and again after the kubelet restarts), so making a
    client does no I/O; a missing or dead socket fails the call at once with UNAVAILABLE
    (not after ``timeout_s``), and a kubelet that accepts but does not answer with
    DEADLINE_EXCEEDED after ``timeout_s``. ``ValueError`` for a path too long for a socket."""

    def __init__(self, socket: Path = DEFAULT_SOCKET, timeout_s: float = 5.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.socket = Path(socket).absolute()
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"socket path {self.socket} is longer than a unix socket allows "
                f"({MAX_SOCKET_PATH} bytes)"
            )
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            f"unix://{self.socket}",
            options=[
                ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
                ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ],
        )

    def list(self) -> list[PodDevices]:
        """Every pod the kubelet accounts resources to, with its containers' devices."""
        data = self._call(LIST_METHOD)
        return self._decoded(LIST_METHOD, decode_list, data)

    def allocatable(self) -> dict[str, tuple[str, ...]]:
        """The device IDs the node can allocate, by resource name."""
        data = self._call(ALLOCATABLE_METHOD)
        return self._decoded(ALLOCATABLE_METHOD, decode_allocatable, data)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PodResourcesClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: str) -> bytes:
        # No serializers: the empty request goes as b"" and the answer comes back as bytes,
        # so a decoding error is ours to report (inside gRPC it would become a bare INTERNAL).
        call = self._channel.unary_unary(method)
        try:
            answer = call(b"", timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise PodResourcesError(
                f"could not ask the kubelet at {self.socket} ({_short(method)}): {_status(e)}"
                f"{self._hint()}"
            ) from e
        if not isinstance(answer, bytes):
            raise PodResourcesError(
                f"gRPC returned {type(answer).__name__}, not bytes, from {self.socket}"
            )
        return answer

    def _decoded(self, method: str, decode: Callable[[bytes], T], data: bytes) -> T:
        try:
            return decode(data)
        except ValueError as e:
            raise PodResourcesError(
                f"the kubelet at {self.socket} sent a malformed {_short(method)} answer "
                f"({len(data)} bytes): {e}"
            ) from e

    def _hint(self) -> str:
        if self.socket.exists():
            return ""
        return "; no socket there: is the kubelet running, and its pod-resources folder mounted?"


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _status(error: grpc.RpcError) -> str:
    # The errors a call raises are also grpc.Call objects, with a code and details.
    if isinstance(error, grpc.Call):
        code = error.code()
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        return f"{name} ({error.details()})"
    return str(error) or type(error).__name__


# Messages, read field by field. Field numbers from k8s.io/kubelet's podresources/v1/api.proto.


def _pod(data: bytes) -> PodDevices:
    # PodResources{string name = 1; string namespace = 2; repeated ContainerResources
    # containers = 3}
    name = namespace = ""
    containers: list[ContainerDevices] = []
    for number, value in _known(data, 1, 2, 3):
        if number == 1:
            name = _text(value, "PodResources.name")
        elif number == 2:
            namespace = _text(value, "PodResources.namespace")
        else:
            containers.append(_container(value))
    return PodDevices(namespace=namespace, name=name, containers=tuple(containers))


def _container(data: bytes) -> ContainerDevices:
    # ContainerResources{string name = 1; repeated ContainerDevices devices = 2; cpu_ids = 3,
    # memory = 4, dynamic_resources = 5: skipped}
    name = ""
    devices: list[tuple[str, list[str]]] = []
    for number, value in _known(data, 1, 2):
        if number == 1:
            name = _text(value, "ContainerResources.name")
        else:
            devices.append(_container_devices(value))
    return ContainerDevices(name=name, devices=_by_resource(devices))


def _container_devices(data: bytes) -> tuple[str, list[str]]:
    # ContainerDevices{string resource_name = 1; repeated string device_ids = 2; topology = 3:
    # skipped}
    resource = ""
    ids: list[str] = []
    for number, value in _known(data, 1, 2):
        if number == 1:
            resource = _text(value, "ContainerDevices.resource_name")
        else:
            ids.append(_text(value, "ContainerDevices.device_ids"))
    return resource, ids


def _by_resource(entries: Iterable[tuple[str, list[str]]]) -> dict[str, tuple[str, ...]]:
    """One resource's entries (the kubelet sends one per NUMA placement) merged, in order."""
    merged: dict[str, list[str]] = {}
    for resource, ids in entries:
        merged.setdefault(resource, []).extend(ids)
    return {resource: tuple(ids) for resource, ids in merged.items()}


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8: {value[:40]!r}") from e


# The wire format (protobuf.dev/programming-guides/encoding): a message is a run of
# (key, value) records, key = field number << 3 | wire type.

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_MAX_FIELD = (1 << 29) - 1
_MAX_DEPTH = 100  # protobuf's default recursion limit; bounds nested (deprecated) groups
_U64 = (1 << 64) - 1


def _known(data: bytes, *numbers: int) -> Iterator[tuple[int, bytes]]:
    """The length-delimited fields of ``data`` numbered ``numbers`` (every field of interest
    here is a string or a message); all other fields are checked and skipped."""
    for number, wire, value in _fields(data):
        if number in numbers and wire == _LEN:
            assert isinstance(value, bytes)
            yield number, value


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Each field of a message: (number, wire type, value), the value an int (varint, fixed)
    or bytes (length-delimited); groups are skipped. ``ValueError`` where it is malformed."""
    pos = 0
    while pos < len(data):
        number, wire, pos = _key(data, pos)
        if wire == _SGROUP:
            pos = _skip_group(data, pos, number, 1)
            continue
        value, pos = _value(data, pos, number, wire)
        yield number, wire, value


def _key(data: bytes, pos: int) -> tuple[int, int, int]:
    start = pos
    key, pos = _varint(data, pos)
    number, wire = key >> 3, key & 7
    if not 1 <= number <= _MAX_FIELD:
        raise ValueError(f"field number {number} at byte {start} is out of range")
    return number, wire, pos


def _value(data: bytes, pos: int, number: int, wire: int) -> tuple[int | bytes, int]:
    if wire == _VARINT:
        return _varint(data, pos)
    if wire == _LEN:
        size, pos = _varint(data, pos)
        if size > len(data) - pos:
            raise ValueError(
                f"field {number} at byte {pos} needs {size} bytes, {len(data) - pos} left"
            )
        return data[pos : pos + size], pos + size
    if wire in (_I64, _I32):
        size = 8 if wire == _I64 else 4
        if size > len(data) - pos:
            raise ValueError(f"fixed field {number} at byte {pos} is truncated")
        return int.from_bytes(data[pos : pos + size], "little"), pos + size
    what = "an end of group with no start" if wire == _EGROUP else f"wire type {wire}, invalid"
    raise ValueError(f"field {number} before byte {pos} has {what}")


def _skip_group(data: bytes, pos: int, group: int, depth: int) -> int:
    """The position after the end of group ``group``, whose start key ended at ``pos``."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"groups nested more than {_MAX_DEPTH} deep")
    while pos < len(data):
        number, wire, pos = _key(data, pos)
        if wire == _EGROUP:
            if number != group:
                raise ValueError(f"group {group} ended by an end of group {number}")
            return pos
        if wire == _SGROUP:
            pos = _skip_group(data, pos, number, depth + 1)
        else:
            _, pos = _value(data, pos, number, wire)
    raise ValueError(f"group {group} is not ended")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):  # at most 10 bytes for 64 bits
        if pos >= len(data):
            raise ValueError(f"truncated varint at byte {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _U64, pos
    raise ValueError(f"varint longer than 10 bytes before byte {pos}")
