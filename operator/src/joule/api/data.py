"""spec.data: where a job's dataset comes from, and the cache its workers read it from.

A staging pod (no GPU) copies the dataset, a manifest and the files it lists, from the
source into the cache volume and verifies every file against the manifest; the workers are
created once it has finished (reconcile.plan). The operator only names the credentials'
Secret in the staging pod's environment; it never reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from joule.api.types import MAX_SECRET_NAME, SECRET_KEY, SECRET_NAME, SpecError

DEFAULT_PATH = "/data"
BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"  # S3's bucket naming rules, as the CRD has them


@dataclass(frozen=True)
class KeyRef:
    """One key of a Secret or ConfigMap in the job's namespace."""

    name: str
    key: str


@dataclass(frozen=True)
class DataSpec:
    volume: str  # one of spec.volumes: the cache the dataset is staged into
    path: str = DEFAULT_PATH  # where the workers (and the staging pod) mount it
    image: str | None = None  # the staging pod's image; None: the job's image
    s3: str | None = None  # "bucket/prefix"
    endpoint: str | None = None  # the S3 endpoint, https://host:port
    region: str | None = None
    access_key: KeyRef | None = None
    secret_key: KeyRef | None = None
    https: str | None = None  # the URL of the folder that holds manifest.json
    claim: str | None = None  # a PersistentVolumeClaim that holds the dataset
    sub_path: str = ""  # the dataset's folder inside that claim
    ca_bundle: KeyRef | None = None  # a ConfigMap key: the CA that signs the source's TLS

    @property
    def source(self) -> str:
        """The source as a message names it."""
        if self.s3 is not None:
            return f"s3://{self.s3} at {self.endpoint}"
        if self.https is not None:
            return self.https
        return f"persistentVolumeClaim {self.claim}/{self.sub_path}".rstrip("/")

    def staged_dir(self, job_name: str) -> str:
        """Where the job's copy lies: one folder per job on the shared cache volume."""
        return f"{self.path.rstrip('/')}/{job_name}"


def parse_data(d: Any) -> DataSpec | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise SpecError(f"spec.data must be an object, not {d!r}")
    volume, path = d.get("volume"), d.get("path", DEFAULT_PATH)
    if not isinstance(volume, str) or not volume:
        raise SpecError("spec.data.volume must name one of spec.volumes: the dataset's cache")
    if not isinstance(path, str) or not path.startswith("/"):
        raise SpecError(f"spec.data.path must be an absolute path, not {path!r}")
    image = d.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise SpecError(f"spec.data.image must be an image name, not {image!r}")
    source = d.get("source")
    kinds = [k for k in ("s3", "https", "persistentVolumeClaim") if k in (source or {})]
    if not isinstance(source, dict) or len(kinds) != 1 or len(source) != 1:
        raise SpecError("spec.data.source needs exactly one of s3, https or persistentVolumeClaim")
    common = {"volume": volume, "path": path, "image": image}
    src = source[kinds[0]]
    if not isinstance(src, dict):
        raise SpecError(f"spec.data.source.{kinds[0]} must be an object")
    where = f"spec.data.source.{kinds[0]}"
    ca = _ref(src.get("caBundle"), f"{where}.caBundle", "configMapKeyRef")
    if kinds[0] == "s3":
        bucket, prefix = src.get("bucket"), str(src.get("prefix", "")).strip("/")
        endpoint = src.get("endpoint")
        if not isinstance(bucket, str) or not re.fullmatch(BUCKET, bucket):
            raise SpecError(
                f"{where}.bucket must be a bucket name (3-63 lowercase letters, digits, '.' "
                f"and '-'), not {bucket!r}"
            )
        if not isinstance(endpoint, str) or not re.match(r"^https?://[^/\s]+", endpoint):
            raise SpecError(f"{where}.endpoint must be an http(s) URL, not {endpoint!r}")
        access = _ref(src.get("accessKeyId"), f"{where}.accessKeyId", "secretKeyRef")
        secret = _ref(src.get("secretAccessKey"), f"{where}.secretAccessKey", "secretKeyRef")
        if access is None or secret is None:
            raise SpecError(f"{where} needs accessKeyId and secretAccessKey (secretKeyRef each)")
        region = src.get("region")
        return DataSpec(
            **common,
            s3=f"{bucket}/{prefix}".rstrip("/"),
            endpoint=endpoint.rstrip("/"),
            region=region if isinstance(region, str) and region else None,
            access_key=access,
            secret_key=secret,
            ca_bundle=ca,
        )
    if kinds[0] == "https":
        url = src.get("url")
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
            raise SpecError(f"{where}.url must be an http(s) URL, not {url!r}")
        return DataSpec(**common, https=url, ca_bundle=ca)
    claim, sub = src.get("claimName"), str(src.get("path", "")).strip("/")
    if not isinstance(claim, str) or not re.fullmatch(SECRET_NAME, claim):
        raise SpecError(f"{where}.claimName must be a claim's name, not {claim!r}")
    if ".." in sub.split("/"):
        raise SpecError(f"{where}.path must stay inside the claim, not {sub!r}")
    return DataSpec(**common, claim=claim, sub_path=sub)


def _ref(d: Any, where: str, kind: str) -> KeyRef | None:
    """``{<kind>: {name, key}}`` (as a container's env valueFrom says it), or None."""
    if d is None:
        return None
    ref = d.get(kind) if isinstance(d, dict) else None
    name, key = (ref or {}).get("name"), (ref or {}).get("key")
    if (
        not isinstance(name, str)
        or len(name) > MAX_SECRET_NAME
        or not re.fullmatch(SECRET_NAME, name)
        or not isinstance(key, str)
        or not re.fullmatch(SECRET_KEY, key)
    ):
        raise SpecError(f"{where} needs {kind}: {{name, key}}, a name and a key, not {d!r}")
    return KeyRef(name, key)
