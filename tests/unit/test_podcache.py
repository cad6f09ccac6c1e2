"""The pod cache's table: what a reconcile reads after watch events, its own calls' answers,
late answers and a relisting. The watch itself runs against the API server in
tests/integration/test_podcache.py."""

from joule.api.types import JobRef
from joule.constants import LABEL_INDEX, LABEL_JOB
from joule.podcache import PodCache

JOB = JobRef("train", "ml", "uid-job")


def pod(name: str, version: int, uid: str | None = None, owner: str = "uid-job", **status):
    return {
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": uid or f"uid-{name}",
            "resourceVersion": str(version),
            "labels": {LABEL_JOB: "train", LABEL_INDEX: name[-1]},
            "ownerReferences": [{"uid": owner, "controller": True}],
        },
        "spec": {},
        "status": {"phase": "Pending", **status},
    }


def synced(cache: PodCache, pods=()) -> PodCache:
    cache._replace("", list(pods))
    cache._synced.add("")
    return cache


def test_before_its_first_listing_the_cache_says_it_does_not_know():
    cache = PodCache(core=None)
    assert cache.pods(JOB) is None
    synced(cache)
    assert cache.pods(JOB) == []


def test_watch_events_add_change_and_remove_pods_and_name_their_job():
    cache = synced(PodCache(core=None))
    assert cache._put(pod("w-0", 10), deleted=False) == ("ml", "train")
    assert [p.phase for p in cache.pods(JOB)] == ["Pending"]
    cache._put(pod("w-0", 11, phase="Running"), deleted=False)
    assert [p.phase for p in cache.pods(JOB)] == ["Running"]
    assert cache._put(pod("w-0", 12), deleted=True) == ("ml", "train")
    assert cache.pods(JOB) == [] and len(cache) == 0


def test_only_the_pods_the_job_owns_are_its_pods():
    cache = synced(PodCache(core=None))
    cache._put(pod("w-0", 10), deleted=False)
    cache._put(pod("w-1", 11, owner="uid-namesake"), deleted=False)  # an earlier job's
    assert [p.name for p in cache.pods(JOB)] == ["w-0"]


def test_an_answer_older_than_the_watch_does_not_replace_what_it_reported():
    cache = synced(PodCache(core=None))
    cache._put(pod("w-0", 20, phase="Failed"), deleted=False)
    cache.observe(pod("w-0", 15))  # the create answer, arriving after the watch's news
    assert [p.phase for p in cache.pods(JOB)] == ["Failed"]


def test_a_deleted_pod_is_not_brought_back_by_a_late_answer():
    cache = synced(PodCache(core=None))
    cache._put(pod("w-0", 10), deleted=False)
    cache._put(pod("w-0", 12), deleted=True)
    cache.observe(pod("w-0", 11))  # the delete call's own answer, later than the watch
    assert cache.pods(JOB) == []
    # A replacement is a new pod (a new UID), under the same name: it is held.
    cache.observe(pod("w-0", 13, uid="uid-w-0-again"))
    assert [p.uid for p in cache.pods(JOB)] == ["uid-w-0-again"]


def test_what_the_operator_created_is_read_before_the_watch_reports_it():
    cache = synced(PodCache(core=None))
    cache.observe(pod("w-1", 30))
    assert [p.name for p in cache.pods(JOB)] == ["w-1"]


def test_a_relisting_drops_what_went_missing_and_names_the_jobs_that_changed():
    cache = synced(PodCache(core=None), [pod("w-0", 1), pod("w-1", 2)])
    other = pod("x-0", 3)
    other["metadata"]["labels"][LABEL_JOB] = "other"
    cache._put(other, deleted=False)
    changed = cache._replace("", [pod("w-0", 1), other])
    assert changed == {("ml", "train")}  # w-1 was deleted during the gap
    assert [p.name for p in cache.pods(JOB)] == ["w-0"]


def test_a_pod_without_the_job_label_or_an_index_is_not_held():
    cache = synced(PodCache(core=None))
    stray = pod("w-0", 5)
    del stray["metadata"]["labels"][LABEL_INDEX]
    assert cache._put(stray, deleted=False) is None
    assert len(cache) == 0
