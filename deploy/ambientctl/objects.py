"""``ambientctl apply|delete|get|label``: kubectl's object commands, against any API server.

The server is ``--server URL``, else ``$AMBIENT_SERVER``, else the API server of the local
cluster (``--cluster``, ``$AMBIENT_CLUSTER`` or ``ambient``) from its ``state.json``.

``apply`` reads every document first and checks all of them (known kind, matching
apiVersion, valid name, namespace present on the server or created by an earlier
document) before it writes any, so a bad file applies nothing.  Then each document is
created, or merged into the stored object the way ``kubectl apply`` does (and compatibly
with it, through the same ``last-applied-configuration`` annotation): maps merge, lists and
values from the document win, a field the previous apply set and this document omits is
removed, fields other writers set (a Service's ``clusterIP``, labels added by a controller)
stay, and the stored status is kept.  An object that would not change is ``unchanged``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import trio
import yaml

from common.errors import ApiServerUnreachableError, ConfigError, KubeApiError, MeshError
from common.kube.client import KubeClient, fill_type
from common.kube.config import KubeConfig
from common.kube.resources import ResourceType, lookup
from deploy.local import cluster
from deploy.local.apiserver.validation import check_object, name_problem

T = TypeVar("T")
_TABLE_ACCEPT = ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
_CONFLICT_RETRIES = 3


# -- server address -----------------------------------------------------------------------------


def resolve_server(args: argparse.Namespace) -> str:
    """The API server URL for this invocation (see the module docstring for the order)."""
    server = args.server or os.environ.get("AMBIENT_SERVER")
    if server:
        return str(server)
    name = getattr(args, "cluster", None) or cluster.default_name()
    try:
        state = cluster.read_state(name)
    except MeshError as exc:
        raise ConfigError(f"{exc}; or pass --server URL / set AMBIENT_SERVER") from exc
    if not state.get("server"):
        raise ConfigError(f"local cluster {name!r} is still starting (no API server address "
                          "yet): wait for `ambientctl cluster up` to finish")
    return str(state["server"])


def _run(args: argparse.Namespace, work: Callable[[KubeClient], Awaitable[T]]) -> T:
    config = KubeConfig.for_server(resolve_server(args), namespace=args.namespace or "default")

    async def main() -> T:
        async with KubeClient(config, timeout=10.0) as client:
            return await work(client)

    return trio.run(main)


# -- kinds and documents ---------------------------------------------------------------------


def resource(name: str) -> ResourceType:
    rt = lookup(name)
    if rt is None:
        raise ConfigError(f"unknown resource type {name!r}: try pods, services, deployments, "
                          "namespaces, nodes, endpointslices, gateways, httproutes, "
                          "virtualservices, destinationrules, authorizationpolicies, "
                          "peerauthentications, serviceentries")
    return rt


def display_name(rt: ResourceType, name: str) -> str:
    """kubectl's ``kind.group/name`` (``deployment.apps/web``, ``pod/web-1``)."""
    kind = f"{rt.singular}.{rt.group}" if rt.group else rt.singular
    return f"{kind}/{name}"


class Document:
    """One object from the input, with where it came from, for error messages."""

    def __init__(self, source: str, index: int, body: Any) -> None:
        self.source, self.index, self.body = source, index, body

    def where(self) -> str:
        what = ""
        if isinstance(self.body, dict):
            raw_meta = self.body.get("metadata")
            meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
            kind, name = self.body.get("kind") or "?", meta.get("name") or "?"
            ns = meta.get("namespace")
            what = f" ({kind} {ns}/{name})" if ns else f" ({kind} {name})"
        return f"{self.source} document {self.index}{what}"

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where()}: {message}")


def _files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
    if not p.exists():
        raise ConfigError(f"{path}: no such file or directory")
    return [p]


def load_documents(paths: Iterable[str], stdin: str | None = None) -> list[Document]:
    """Every non-empty YAML/JSON document of the given files, directories or ``-``."""
    docs: list[Document] = []
    for path in paths:
        sources = [("<stdin>", stdin if stdin is not None else sys.stdin.read())] if path == "-" \
            else [(str(f), f.read_text()) for f in _files(path)]
        for source, text in sources:
            try:
                bodies = list(yaml.safe_load_all(text))
            except yaml.YAMLError as exc:
                line = getattr(getattr(exc, "problem_mark", None), "line", None)
                at = f" at line {line + 1}" if line is not None else ""
                raise ConfigError(f"{source}: malformed YAML{at}: "
                                  f"{getattr(exc, 'problem', None) or exc}") from exc
            index = 0
            for body in bodies:
                if body is None:
                    continue
                index += 1
                items = body.get("items") if isinstance(body, dict) and \
                    str(body.get("kind", "")).endswith("List") else None
                for item in items if isinstance(items, list) else [body]:
                    docs.append(Document(source, index, item))
    return docs


def check_document(doc: Document, default_namespace: str) -> tuple[ResourceType, dict[str, Any]]:
    """The resource type and normalised body of a document, or a ConfigError naming the field."""
    body = doc.body
    if not isinstance(body, dict):
        raise doc.fail("not an object (a mapping with apiVersion, kind, metadata)")
    for field in ("apiVersion", "kind"):
        if not isinstance(body.get(field), str) or not body[field]:
            raise doc.fail(f"{field}: required")
    rt = lookup(body["kind"])
    if rt is None or rt.kind != body["kind"]:
        raise doc.fail(f"kind: unknown kind {body['kind']!r}")
    if body["apiVersion"] not in {rt.api_version_for(v) for v in rt.versions}:
        raise doc.fail(f"apiVersion: {body['apiVersion']!r} does not serve {rt.kind} "
                       f"(use {rt.api_version})")
    meta = body.get("metadata")
    if not isinstance(meta, dict):
        raise doc.fail("metadata: required")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise doc.fail("metadata.name: required")
    if problem := name_problem(name, rt.name_is_label):
        raise doc.fail(f"metadata.name: {problem}")
    if rt.namespaced:
        meta.setdefault("namespace", default_namespace)
        if problem := name_problem(str(meta["namespace"]), True):
            raise doc.fail(f"metadata.namespace: {problem}")
    else:
        meta.pop("namespace", None)
    # The local API server's own checks (labels, annotations...), run before anything is
    # written so that a document it would refuse cannot leave the ones before it applied.
    try:
        check_object(rt, rt.version, copy.deepcopy(body), meta.get("namespace"), None,
                     creating=False)
    except KubeApiError as exc:
        raise doc.fail(str(exc).split(" is invalid: ", 1)[-1]) from exc
    return rt, body


# -- apply ----------------------------------------------------------------------------------------


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _three_way(stored: Any, last: Any, wanted: Any) -> Any:
    """Maps merge key by key; a key the previous apply set and this one omits is removed;
    anything else (lists, scalars) is taken from ``wanted``."""
    if not isinstance(wanted, dict) or not isinstance(stored, dict):
        return wanted
    last = last if isinstance(last, dict) else {}
    result = {k: v for k, v in stored.items() if not (k in last and k not in wanted)}
    for key, value in wanted.items():
        result[key] = _three_way(stored.get(key), last.get(key), value)
    return result


def with_last_applied(wanted: dict[str, Any]) -> dict[str, Any]:
    """``wanted`` carrying itself in the last-applied annotation, byte for byte as kubectl
    writes it (sorted compact JSON, ``annotations`` present even when empty), so that
    ``ambientctl apply`` and ``kubectl apply`` agree on what is unchanged."""
    meta = dict(wanted.get("metadata", {}))
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED}
    record = {k: v for k, v in wanted.items() if k != "status"}
    record["metadata"] = {**meta, "annotations": annotations}
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    meta["annotations"] = {**annotations, LAST_APPLIED: text + "\n"}
    return {**wanted, "metadata": meta}


def merged(stored: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """``wanted`` applied to ``stored`` (see the module docstring); status is never touched."""
    try:
        last = json.loads(stored.get("metadata", {}).get("annotations", {}).get(LAST_APPLIED, ""))
    except ValueError:
        last = {}
    wanted = {k: v for k, v in with_last_applied(wanted).items() if k != "status"}
    last = {k: v for k, v in last.items() if k != "status"} if isinstance(last, dict) else {}
    stored_rest = {k: v for k, v in stored.items() if k != "status"}
    result: dict[str, Any] = _three_way(stored_rest, last, wanted)
    if "status" in stored:
        result["status"] = stored["status"]
    return result


async def _namespaces(client: KubeClient) -> set[str]:
    data = await client.request("GET", "/api/v1/namespaces")
    return {item["metadata"]["name"] for item in data.get("items") or []}


async def _apply_one(client: KubeClient, rt: ResourceType, body: dict[str, Any]) -> str:
    meta = body["metadata"]
    ns = meta.get("namespace")
    path = rt.object_path(meta["name"], ns)
    for _ in range(_CONFLICT_RETRIES):
        try:
            stored = await client.request("GET", path)
        except KubeApiError as exc:
            if exc.code != 404:
                raise
            await client.request("POST", rt.collection_path(ns), body=with_last_applied(body))
            return "created"
        fill_type(stored, rt)
        new = merged(stored, body)
        if {**new, "apiVersion": ""} == {**stored, "apiVersion": ""}:
            return "unchanged"
        try:
            await client.request("PUT", path, body=new)
        except KubeApiError as exc:
            if exc.code == 409:  # someone wrote in between: merge into the newer object
                continue
            raise
        return "configured"
    raise ConfigError(f"{display_name(rt, meta['name'])}: kept conflicting with other writers; "
                      "try again")


def cmd_apply(args: argparse.Namespace) -> int:
    docs = load_documents(args.filename)
    if not docs:
        raise ConfigError("no objects passed to apply")
    checked = [(doc, *check_document(doc, args.namespace or "default")) for doc in docs]

    async def work(client: KubeClient) -> None:
        existing = await _namespaces(client)
        for doc, rt, body in checked:
            if rt.kind == "Namespace":
                existing.add(body["metadata"]["name"])
            elif rt.namespaced and body["metadata"]["namespace"] not in existing:
                raise doc.fail(f"metadata.namespace: namespace "
                               f"{body['metadata']['namespace']!r} does not exist (create it "
                               "first, or add a Namespace document before this one)")
        for doc, rt, body in checked:
            try:
                outcome = await _apply_one(client, rt, body)
            except ApiServerUnreachableError:
                raise
            except KubeApiError as exc:
                raise doc.fail(str(exc)) from exc
            _print(f"{display_name(rt, body['metadata']['name'])} {outcome}")

    _run(args, work)
    return 0


# -- delete ----------------------------------------------------------------------------------------


def cmd_delete(args: argparse.Namespace) -> int:
    targets: list[tuple[ResourceType, str, str | None]] = []
    if args.filename:
        if args.kind:
            raise ConfigError("give either -f FILE or KIND NAME, not both")
        for doc in load_documents(args.filename):
            rt, body = check_document(doc, args.namespace or "default")
            targets.append((rt, body["metadata"]["name"], body["metadata"].get("namespace")))
    else:
        if args.kind and "/" in args.kind:  # kubectl's TYPE/NAME form
            args.kind, first = args.kind.split("/", 1)
            args.names = [first, *args.names]
        if not args.kind or not args.names:
            raise ConfigError("delete needs -f FILE or KIND NAME...")
        rt = resource(args.kind)
        targets = [(rt, name, args.namespace or "default" if rt.namespaced else None)
                   for name in args.names]
    failed = False
    # Deleting a Namespace takes its objects along at once; the objects of a namespace
    # deleted earlier in this run are reported deleted rather than missing.
    gone_namespaces: set[str] = set()

    async def work(client: KubeClient) -> None:
        nonlocal failed
        for rt, name, ns in targets:
            try:
                await client.request("DELETE", rt.object_path(name, ns))
                if rt.kind == "Namespace":
                    gone_namespaces.add(name)
            except KubeApiError as exc:
                if exc.code == 404 and (args.ignore_not_found or ns in gone_namespaces):
                    if ns in gone_namespaces:
                        print(f"{display_name(rt, name)} deleted")
                    continue
                if exc.code != 404:
                    raise
                print(f"error: {display_name(rt, name)}: not found", file=sys.stderr)
                failed = True
                continue
            print(f"{display_name(rt, name)} deleted")

    _run(args, work)
    return 1 if failed else 0


# -- get ------------------------------------------------------------------------------------------


def format_table(table: dict[str, Any], *, all_namespaces: bool, wide: bool) -> str:
    """kubectl's columns: upper-case headers, left-aligned, three spaces apart."""
    columns = [(i, c["name"].upper()) for i, c in enumerate(table.get("columnDefinitions", []))
               if wide or not c.get("priority")]
    header = [name for _, name in columns]
    rows = []
    for row in table.get("rows", []):
        cells = [str(row["cells"][i]) for i, _ in columns]
        if all_namespaces:
            cells.insert(0, str(row.get("object", {}).get("metadata", {}).get("namespace", "")))
        rows.append(cells)
    if all_namespaces:
        header.insert(0, "NAMESPACE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


def _ordered(obj: Any) -> Any:
    """apiVersion, kind, metadata, then the rest, in every object, as kubectl prints them."""
    if isinstance(obj, list):
        return [_ordered(o) for o in obj]
    if not isinstance(obj, dict):
        return obj
    first = [k for k in ("apiVersion", "kind", "metadata") if k in obj]
    return {k: _ordered(obj[k]) for k in [*first, *(k for k in obj if k not in first)]}


def cmd_get(args: argparse.Namespace) -> int:
    if "/" in args.kind and not args.name:  # kubectl's TYPE/NAME form
        args.kind, args.name = args.kind.split("/", 1)
    kinds = [resource(k) for k in args.kind.split(",") if k]
    if not kinds:
        raise ConfigError("get needs a resource type (pods, svc, deploy, ...)")
    if args.name and (args.all_namespaces or len(kinds) > 1):
        raise ConfigError("a name selects one object: give one resource type and no -A")
    params = {"labelSelector": args.selector} if args.selector else None
    several = len(kinds) > 1

    def namespace_of(rt: ResourceType) -> str | None:
        return None if args.all_namespaces or not rt.namespaced else (args.namespace or "default")

    async def objects(client: KubeClient, rt: ResourceType) -> list[dict[str, Any]]:
        ns = namespace_of(rt)
        if args.name:
            return [fill_type(await client.request("GET", rt.object_path(args.name, ns)), rt)]
        data = await client.request("GET", rt.collection_path(ns), params=params)
        return [fill_type(i, rt) for i in data.get("items") or []]

    async def table_text(client: KubeClient, rt: ResourceType) -> str:
        ns = namespace_of(rt)
        path = rt.object_path(args.name, ns) if args.name else rt.collection_path(ns)
        table = await client.request("GET", path, params=params, accept=_TABLE_ACCEPT)
        if table.get("kind") != "Table":
            raise ConfigError(f"the server at {client.config.server} does not print tables")
        if not table.get("rows"):
            return ""
        if several:  # kubectl names rows kind/name when it prints several kinds
            column = next((i for i, c in enumerate(table["columnDefinitions"])
                           if c["name"] == "Name"), 0)
            for row in table["rows"]:
                row["cells"][column] = display_name(rt, str(row["cells"][column]))
        return format_table(table, all_namespaces=ns is None and rt.namespaced,
                            wide=args.output == "wide")

    async def work(client: KubeClient) -> str:
        if args.output in ("json", "yaml", "name"):
            pairs = [(rt, obj) for rt in kinds for obj in await objects(client, rt)]
            if args.output == "name":
                return "\n".join(display_name(rt, o["metadata"]["name"]) for rt, o in pairs)
            items = [obj for _, obj in pairs]
            data = items[0] if args.name else {"apiVersion": "v1", "kind": "List",
                                                "items": items}
            data = _ordered(data)
            if args.output == "json":
                return json.dumps(data, indent=4)
            return yaml.safe_dump(data, sort_keys=False).rstrip()
        texts = [t for rt in kinds if (t := await table_text(client, rt))]
        if not texts:
            ns = namespace_of(kinds[0])
            print(f"No resources found{f' in {ns} namespace' if ns else ''}.", file=sys.stderr)
        return "\n\n".join(texts)

    text = _run(args, work)
    if text:
        _print(text)
    return 0


def _print(text: str) -> None:
    """Print, tolerating a reader that stopped early (``ambientctl get ... | head``)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# -- label --------------------------------------------------------------------------------------


def parse_label_changes(specs: list[str]) -> dict[str, str | None]:
    changes: dict[str, str | None] = {}
    for spec in specs:
        if spec.endswith("-") and "=" not in spec:
            changes[spec[:-1]] = None
        elif "=" in spec:
            key, value = spec.split("=", 1)
            changes[key] = value
        else:
            raise ConfigError(f"label {spec!r}: use key=value to set or key- to remove")
    return changes


def cmd_label(args: argparse.Namespace) -> int:
    if "/" in args.kind:  # kubectl's TYPE/NAME form: the "name" was the first label
        args.labels = [args.name, *args.labels]
        args.kind, args.name = args.kind.split("/", 1)
    rt = resource(args.kind)
    if not args.labels:
        raise ConfigError("label needs at least one key=value or key-")
    changes = parse_label_changes(args.labels)
    ns = (args.namespace or "default") if rt.namespaced else None
    path = rt.object_path(args.name, ns)

    async def work(client: KubeClient) -> None:
        stored = await client.request("GET", path)
        current = stored.get("metadata", {}).get("labels") or {}
        for key, value in changes.items():
            if value is not None and key in current and current[key] != value \
                    and not args.overwrite:
                raise ConfigError(f"{display_name(rt, args.name)}: label {key!r} already has "
                                  f"value {current[key]!r}; pass --overwrite to change it")
        patch = {"metadata": {"labels": changes,
                              "resourceVersion": stored["metadata"]["resourceVersion"]}}
        await client.request("PATCH", path, body=patch,
                             content_type="application/merge-patch+json")

    _run(args, work)
    verb = "unlabeled" if all(v is None for v in changes.values()) else "labeled"
    print(f"{display_name(rt, args.name)} {verb}")
    return 0


# -- argument parsing -----------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--server", help="API server URL (default: $AMBIENT_SERVER, else the "
                                         "local cluster's)")
    parent.add_argument("--cluster", help="local cluster name, when several are up")
    parent.add_argument("-n", "--namespace", help="namespace (default: default)")
    return parent


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = [_common()]
    apply = sub.add_parser("apply", parents=common, help="create or update objects from YAML",
                           description="Create or update objects from YAML files "
                           "(multi-document), directories or - for stdin.")
    apply.add_argument("-f", "--filename", action="append", required=True,
                       help="file, directory or - (repeatable)")
    apply.set_defaults(func=cmd_apply)

    delete = sub.add_parser("delete", parents=common, help="delete objects",
                            description="Delete the objects in files, or KIND NAME...")
    delete.add_argument("-f", "--filename", action="append", help="file, directory or -")
    delete.add_argument("kind", nargs="?", help="resource type (pods, svc, deploy, ...)")
    delete.add_argument("names", nargs="*", help="object names")
    delete.add_argument("--ignore-not-found", action="store_true",
                        help="treat a missing object as deleted")
    delete.set_defaults(func=cmd_delete)

    get = sub.add_parser("get", parents=common, help="list or show objects",
                         description="List or show objects, as kubectl get does.")
    get.add_argument("kind", help="resource type (pods, po, svc, deploy, ns, vs, dr, ...)")
    get.add_argument("name", nargs="?", help="one object's name")
    get.add_argument("-A", "--all-namespaces", action="store_true", help="across namespaces")
    get.add_argument("-l", "--selector", help="label selector (app=web,version!=v1)")
    get.add_argument("-o", "--output", choices=["wide", "yaml", "json", "name"],
                     help="output format")
    get.set_defaults(func=cmd_get)

    label = sub.add_parser("label", parents=common, help="set or remove labels",
                           description="Set (key=value) or remove (key-) labels of an object.")
    label.add_argument("kind", help="resource type")
    label.add_argument("name", help="object name (or give KIND/NAME as the first argument)")
    label.add_argument("labels", nargs="*", help="key=value or key-")
    label.add_argument("--overwrite", action="store_true", help="replace existing values")
    label.set_defaults(func=cmd_label)
