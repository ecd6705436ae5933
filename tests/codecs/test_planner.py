"""The delta-base / keyframe decision as a pure function (format §10.5)."""

from __future__ import annotations

from typing import Any

from ckptstore.codecs.planner import delta_base


def linear_run(n: int, k: int) -> list[str]:
    """Object ids of tensor ``w`` over ``n`` checkpoints as the planner would choose them, and their records."""
    history: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (tensors, objects) per checkpoint
    ids: list[str] = []
    for step in range(n):
        oid = f"o{step}"
        objects: dict[str, Any] = dict(history[-1][1]) if history else {}
        if history:
            tensors, prev_objects = history[-1]

            def before(j: int) -> str | None:
                return history[-2 - j][0]["w"]["object"] if j + 2 <= len(history) else None

            plan = delta_base("w", "float32", (4,), tensors, prev_objects, before, k)
        else:
            plan = None
        objects[oid] = {"depth": 0} if plan is None else {"depth": plan[1], "refs": {"prev": plan[0]}}
        history.append(({"w": {"dtype": "float32", "shape": [4], "object": oid}}, objects))
        ids.append(f"{oid}<-{plan[0]}" if plan else f"{oid}*")
    return ids


def test_keyframes_every_k_times_k_plus_1_over_2() -> None:
    plan = linear_run(12, 4)
    assert plan[:4] == ["o0*", "o1<-o0", "o2<-o1", "o3<-o2"]
    assert plan[4:10] == ["o4<-o0", "o5<-o4", "o6<-o5", "o7<-o4", "o8<-o7", "o9<-o7"]  # chain full: segment roots
    assert [p for p in plan if p.endswith("*")] == ["o0*", "o10*"]  # K(K+1)/2 = 10


def test_no_base_when_the_tensor_changed_dtype_or_shape() -> None:
    tensors = {"w": {"dtype": "float32", "shape": [4], "object": "a"}}
    objects = {"a": {"depth": 0}}
    assert delta_base("w", "float32", (4,), tensors, objects, lambda j: None, 4) == ("a", 1)
    assert delta_base("w", "float16", (4,), tensors, objects, lambda j: None, 4) is None
    assert delta_base("w", "float32", (2, 2), tensors, objects, lambda j: None, 4) is None
    assert delta_base("v", "float32", (4,), tensors, objects, lambda j: None, 4) is None
    assert delta_base("w", "float32", (4,), tensors, objects, lambda j: None, 1) is None  # interval 1: keyframes
