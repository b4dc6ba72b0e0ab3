from __future__ import annotations

import pytest

from common.errors import KubeApiError
from deploy.local.apiserver.patch import json_patch, merge_patch, strategic_merge_patch

POD = {"metadata": {"labels": {"a": "1", "b": "2"}},
       "spec": {"containers": [{"name": "app", "image": "v1", "env": [{"name": "X", "value": "1"}],
                                "ports": [{"containerPort": 80}]},
                               {"name": "side", "image": "s"}],
                "args": ["--a", "--b"]}}


def test_merge_patch_rfc7386() -> None:
    out = merge_patch(POD, {"metadata": {"labels": {"a": None, "c": "3"}},
                            "spec": {"containers": [{"name": "only"}]}})
    assert out["metadata"]["labels"] == {"b": "2", "c": "3"}
    assert out["spec"]["containers"] == [{"name": "only"}]  # lists are replaced
    assert POD["metadata"]["labels"] == {"a": "1", "b": "2"}  # input untouched


def test_strategic_merge_merges_lists_by_merge_key() -> None:
    out = strategic_merge_patch(POD, {"spec": {
        "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}],
        "containers": [{"name": "app", "image": "v2",
                        "env": [{"name": "Y", "value": "2"}]}]}})
    app = out["spec"]["containers"][0]
    assert app["image"] == "v2" and app["ports"] == [{"containerPort": 80}]
    assert app["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    assert out["spec"]["containers"][1] == {"name": "side", "image": "s"}
    assert "$setElementOrder/containers" not in out["spec"]


def test_strategic_merge_directives() -> None:
    deleted = strategic_merge_patch(POD, {"spec": {"containers": [
        {"name": "side", "$patch": "delete"}]}})
    assert [c["name"] for c in deleted["spec"]["containers"]] == ["app"]
    replaced = strategic_merge_patch(POD, {"metadata": {"labels": {"$patch": "replace",
                                                                   "z": "9"}}})
    assert replaced["metadata"]["labels"] == {"z": "9"}
    pruned = strategic_merge_patch(POD, {"spec": {"$deleteFromPrimitiveList/args": ["--a"]}})
    assert pruned["spec"]["args"] == ["--b"]
    gone = strategic_merge_patch(POD, {"metadata": {"labels": {"$patch": "delete"}}})
    assert "labels" not in gone["metadata"]


def test_json_patch_operations_and_failed_test() -> None:
    out = json_patch(POD, [
        {"op": "add", "path": "/metadata/labels/c", "value": "3"},
        {"op": "remove", "path": "/metadata/labels/a"},
        {"op": "replace", "path": "/spec/containers/0/image", "value": "v3"},
        {"op": "copy", "from": "/metadata/labels/b", "path": "/metadata/labels/d"},
        {"op": "move", "from": "/spec/args", "path": "/spec/command"},
        {"op": "add", "path": "/spec/command/-", "value": "--c"},
        {"op": "test", "path": "/metadata/labels/b", "value": "2"},
        {"op": "add", "path": "/metadata/annotations", "value": {"k~/x": "v"}},
        {"op": "replace", "path": "/metadata/annotations/k~0~1x", "value": "w"},
    ])
    assert out["metadata"]["labels"] == {"b": "2", "c": "3", "d": "2"}
    assert out["spec"]["command"] == ["--a", "--b", "--c"] and "args" not in out["spec"]
    assert out["metadata"]["annotations"] == {"k~/x": "w"}
    for bad in ([{"op": "test", "path": "/metadata/labels/a", "value": "no"}],
                [{"op": "remove", "path": "/nope/x"}], [{"op": "frobnicate", "path": "/a"}],
                {"op": "add"}):
        with pytest.raises(KubeApiError) as err:
            json_patch(POD, bad)
        assert err.value.code == 400
