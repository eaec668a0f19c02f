"""Nothing a tenant writes on their own objects decides which node acts on them or stops the controller.

An agent acts only on objects whose spec.nodeName and node label both name its node; the controller
puts back a node label someone changed; kopf's memory of the handlers is out of the tenants' reach and
never forgets an object in flight, however many others a tenant creates.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

import kopf
import pytest

from checkpointer import NODE_LABEL, kopf_prefix
from checkpointer.__main__ import _kopf_settings
from checkpointer.agent import _current, _handling, elsewhere
from checkpointer.controller import _Labelling, label_to_restore
from checkpointer.memory import InFlight, Memory, RememberedDiffBase, RememberedProgress

CONTROLLER = kopf_prefix("controller")


def body(uid: str, annotations: dict[str, str] | None = None, version: str = "1", **fields: Any) -> kopf.Body:
    meta = {"name": f"ccp-{uid}", "namespace": "team-a", "uid": uid, "resourceVersion": version}
    raw = {
        "apiVersion": "checkpointer.dev/v1alpha1",
        "kind": "ContainerCheckpoint",
        "metadata": {**meta, "annotations": annotations or {}},
        **fields,
    }
    return kopf.Body(cast(kopf.RawBody, raw))


def record(retries: int) -> kopf.ProgressRecord:
    return {"retries": retries, "delayed": "2026-12-07T00:00:00.000000+00:00"}


def patch() -> kopf.Patch:
    return kopf.Patch()


# --- kopf's memory -------------------------------------------------------------------------------


def test_both_roles_keep_kopfs_memory_out_of_annotations() -> None:
    for role, node in (("controller", None), ("agent", "node-a")):
        settings = _kopf_settings(role, node, Memory())
        assert isinstance(settings.persistence.progress_storage, RememberedProgress)
        assert isinstance(settings.persistence.diffbase_storage, RememberedDiffBase)


def test_both_roles_watch_again_soon_after_the_api_server_returns() -> None:
    """kopf's own backoffs grow to 13 s and 21 s: an agent would not see new objects for that long after an
    outage. Capped at 2 s, with the patience of kopf's default before a request gives up."""
    for role, node in (("controller", None), ("agent", "node-a")):
        backoffs = list(_kopf_settings(role, node, Memory()).networking.error_backoffs)
        assert max(backoffs) <= 2.0
        assert sum(backoffs) >= sum(kopf.OperatorSettings().networking.error_backoffs)


def test_kopf_annotations_a_tenant_wrote_are_never_read() -> None:
    """A handler marked done and a last-handled configuration, written at creation under the controller's prefix."""
    memory = Memory()
    progress, diffbase = memory.progress_storage(CONTROLLER), memory.diffbase_storage(["metadata.annotations"])
    spec = {"nodeName": "node-a", "containers": ["web"]}
    forged = {
        f"{CONTROLLER}/schedule_checkpoint": json.dumps({"started": "2026-12-07T00:00:00", "success": True}),
        f"{CONTROLLER}/last-handled-configuration": json.dumps({"spec": spec}),
    }
    obj = body("u1", forged, spec=spec)
    assert progress.fetch(key="schedule_checkpoint", body=obj) is None
    assert diffbase.fetch(body=obj) is None  # so kopf sees a new object and schedules it


def test_a_flood_of_objects_never_evicts_one_in_flight() -> None:
    memory = Memory(limit=3)
    progress, diffbase = memory.progress_storage("agent.checkpointer.dev"), memory.diffbase_storage([])
    # A checkpoint whose handler is waiting for kopf's retry (an upload the bucket did not take yet).
    busy = body("busy")
    assert memory.in_flight.begin("busy")
    progress.store(key="take_checkpoint", record=record(2), body=busy, patch=patch())
    memory.in_flight.paused("busy")
    # A tenant creates many objects for the node; each handled once.
    for i in range(50):
        other = body(f"other-{i}")
        progress.store(key="take_checkpoint", record=record(0), body=other, patch=patch())
        diffbase.store(body=other, patch=patch(), essence=cast(kopf.BodyEssence, {"spec": {"i": i}}))
        assert len(memory) <= 3 + 1  # the limit, and the one in flight on top
    assert progress.fetch(key="take_checkpoint", body=busy) == record(2)
    assert diffbase.fetch(body=body("other-0")) is None  # the old ones are forgotten
    assert diffbase.fetch(body=body("other-49")) == {"spec": {"i": 49}}
    # Once its handler is done with it, it is an object like any other.
    memory.in_flight.end("busy")
    for i in range(3):
        progress.store(key="take_checkpoint", record=record(0), body=body(f"late-{i}"), patch=patch())
    assert progress.fetch(key="take_checkpoint", body=busy) is None


def test_every_entry_in_flight_stays_even_past_the_limit() -> None:
    memory = Memory(limit=2)
    progress = memory.progress_storage("agent.checkpointer.dev")
    for i in range(5):
        memory.in_flight.begin(f"u{i}")
        progress.store(key="h", record=record(i), body=body(f"u{i}"), patch=patch())
    assert all(progress.fetch(key="h", body=body(f"u{i}")) == record(i) for i in range(5))


def test_an_object_declined_and_labelled_back_is_new_one_handled_is_not() -> None:
    memory = Memory()
    diffbase = memory.diffbase_storage([])
    handled, declined = body("handled"), body("declined")
    for obj in (handled, declined):
        memory.in_flight.begin(str(obj.metadata.uid))
        diffbase.store(body=obj, patch=patch(), essence=cast(kopf.BodyEssence, {"spec": {}}))
    memory.decline("declined")  # relabelled away while it waited for its scheduled time
    for uid in ("handled", "declined"):
        memory.left(uid)  # the watch sent it as DELETED
        assert uid not in memory.in_flight
    assert diffbase.fetch(body=handled) == {"spec": {}}  # labelled back, it is not run again
    assert diffbase.fetch(body=declined) is None  # labelled back, kopf takes it up


def test_a_handler_is_in_flight_until_it_ends_other_than_by_a_retry() -> None:
    in_flight = InFlight()
    obj = body("u1")
    with pytest.raises(kopf.TemporaryError), _handling(in_flight, obj):
        raise kopf.TemporaryError("the bucket does not answer", delay=5)
    assert "u1" in in_flight
    with pytest.raises(RuntimeError), _handling(in_flight, obj):
        raise RuntimeError("kopf retries this too")
    assert "u1" in in_flight
    # kopf runs one object's handlers one at a time; should a second run begin meanwhile, it waits.
    with _handling(in_flight, obj), pytest.raises(kopf.TemporaryError, match="running"), _handling(in_flight, obj):
        pass
    assert "u1" not in in_flight
    with pytest.raises(kopf.PermanentError), _handling(in_flight, obj):
        raise kopf.PermanentError("failed for good")
    assert "u1" not in in_flight


# --- which node acts -----------------------------------------------------------------------------


def labelled(node: str | None, spec_node: str = "node-a", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "c", "namespace": "team-a", "uid": "u1", "labels": {NODE_LABEL: node} if node else {}},
        "spec": {"nodeName": spec_node},
        "status": status,
    }


def test_an_agent_acts_only_when_spec_and_label_both_name_its_node() -> None:
    assert elsewhere(labelled("node-a"), "node-a") is None
    # Relabelled by its tenant: the node it names does not act, nor does the node it was scheduled on.
    why = elsewhere(labelled("node-b"), "node-b")
    assert why is not None and "spec.nodeName is 'node-a'" in why
    why = elsewhere(labelled("node-b"), "node-a")
    assert why is not None and "label checkpointer.dev/node is 'node-b'" in why
    assert elsewhere(labelled(None), "node-a") is not None
    assert elsewhere({"metadata": {"labels": {NODE_LABEL: "node-a"}}, "spec": {}}, "node-a") is not None


def test_the_controller_puts_back_the_label_of_the_node_it_scheduled() -> None:
    assert label_to_restore(labelled("node-a", nodeName="node-a", phase="Scheduled")) is None
    assert label_to_restore(labelled("node-b", nodeName="node-a", phase="Scheduled")) == "node-a"
    assert label_to_restore(labelled(None, nodeName="node-a", phase="Checkpointing")) == "node-a"
    assert label_to_restore(labelled("node-b", nodeName="node-a", phase="Failed")) == "node-a"
    # Not scheduled (yet, or ever): the label is the controller's to write when it schedules.
    assert label_to_restore(labelled("node-b")) is None
    assert label_to_restore(labelled("node-b", phase="Failed")) is None


def test_the_controllers_own_scheduled_write_is_not_taken_for_a_removed_label() -> None:
    labelling = _Labelling()
    labelling.expect(body("u1"), "41")
    mine = body("u1", version="41")
    assert labelling.coming(mine)
    # Once only: a later event without the label is someone's removal.
    assert not labelling.coming(mine)
    labelling.expect(body("u1"), "41")
    assert not labelling.coming(body("u1", version="45"))


class _Kube:
    def __init__(self, fresh: dict[str, Any] | None) -> None:
        self.fresh, self.reads = fresh, 0

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return self.fresh


def agent_of(node: str, fresh: dict[str, Any] | None) -> Any:
    return SimpleNamespace(settings=SimpleNamespace(node_name=node), kube=_Kube(fresh))


def scheduled(node_label: str, uid: str = "u1") -> dict[str, Any]:
    obj = labelled(node_label, phase="Scheduled", nodeName="node-a")
    obj["metadata"]["uid"] = uid
    return obj


def test_after_its_wait_a_checkpoint_is_read_again_and_left_when_it_was_relabelled_or_made_anew() -> None:
    event = kopf.Body(cast(kopf.RawBody, scheduled("node-a")))
    # At once, its first sight: the event's body, no read.
    agent = agent_of("node-a", scheduled("node-b"))
    assert _current(agent, Memory(), "containercheckpoints", event, retry=0) == dict(event)
    assert agent.kube.reads == 0
    # After the wait for its scheduled time: read again; relabelled meanwhile, it is left alone.
    memory = Memory()
    assert _current(agent, memory, "containercheckpoints", event, retry=0, waited=True) is None
    assert agent.kube.reads == 1
    memory.left("u1")  # it left the watch: labelled back, it is new to kopf
    assert "u1" not in memory
    # Deleted and made anew under its name: not this one.
    agent = agent_of("node-a", scheduled("node-a", uid="u2"))
    assert _current(agent, Memory(), "containercheckpoints", event, retry=0, waited=True) is None
    # Labelled back in time: acted on, as the API server has it.
    agent = agent_of("node-a", scheduled("node-a"))
    assert _current(agent, Memory(), "containercheckpoints", event, retry=0, waited=True) == scheduled("node-a")


def test_a_relabelled_object_is_left_alone_by_the_node_it_names() -> None:
    event = kopf.Body(cast(kopf.RawBody, scheduled("node-b")))
    agent = agent_of("node-b", scheduled("node-b"))
    assert _current(agent, Memory(), "containercheckpoints", event, retry=0) is None
    assert agent.kube.reads == 0
