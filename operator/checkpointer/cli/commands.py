"""`kubectl checkpointer`: thin click commands over plan (the objects), present (what people see) and
session (the cluster and the bucket). See docs/kubectl-plugin.md."""

from __future__ import annotations

import datetime
import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from checkpointer.cli import plan, present
from checkpointer.cli.session import CliError, Session, context_namespace
from checkpointer.models import CheckpointStatus

F = TypeVar("F", bound=Callable[..., Any])
POLL_SECONDS = 0.5
OUTPUTS = click.Choice(["json", "yaml"])

# No markup: names and messages are printed as they are ('[' included), escaped by present.printable.
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


@dataclass
class Cluster:
    """The user's kubeconfig, context and namespace; connects on first use."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace_flag: str | None = None
    _session: Session | None = None

    @property
    def namespace(self) -> str:
        return self.namespace_flag or context_namespace(self.kubeconfig, self.context)

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = Session(self.kubeconfig, self.context)
        return self._session


def cluster_options(fn: F) -> F:
    """-n, --kubeconfig and --context, as kubectl takes them: before or after the command."""

    @click.option("-n", "--namespace", "namespace", default=None, help="Namespace (default: the context's).")
    @click.option("--kubeconfig", default=None, help="Kubeconfig file (default: KUBECONFIG, else ~/.kube/config).")
    @click.option("--context", default=None, help="Kubeconfig context (default: the current one).")
    @functools.wraps(fn)
    def wrapper(*args: Any, namespace: str | None, kubeconfig: str | None, context: str | None, **kwargs: Any) -> Any:
        cluster: Cluster = click.get_current_context().ensure_object(Cluster)
        cluster.namespace_flag = namespace or cluster.namespace_flag
        cluster.kubeconfig = kubeconfig or cluster.kubeconfig
        cluster.context = context or cluster.context
        return fn(*args, cluster=cluster, **kwargs)

    return wrapper  # type: ignore[return-value]


def handled(fn: F) -> F:
    """Errors the user can act on as one line and exit status 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CliError, ValueError) as e:
            raise click.ClickException(present.printable(e)) from None

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-n", "--namespace", default=None, help="Namespace (default: the context's).")
@click.option("--kubeconfig", default=None, help="Kubeconfig file (default: KUBECONFIG, else ~/.kube/config).")
@click.option("--context", default=None, help="Kubeconfig context (default: the current one).")
@click.pass_context
def cli(ctx: click.Context, namespace: str | None, kubeconfig: str | None, context: str | None) -> None:
    """Checkpoint, restore and migrate containers; follow them; read the archives in a storage.

    Everything it does are ordinary ContainerCheckpoint, ContainerRestore and ContainerMigration
    objects: --dry-run prints their YAML.
    """
    ctx.obj = Cluster(kubeconfig=kubeconfig, context=context, namespace_flag=namespace)


# --- printing objects --------------------------------------------------------------------------------


def emit(objects: list[dict[str, Any]], output: str | None) -> None:
    """Objects as -o asks: JSON (one object, or a List), YAML documents."""
    objects = [present.without_managed_fields(o) for o in objects]
    if output == "json":
        doc: Any = objects[0] if len(objects) == 1 else {"apiVersion": "v1", "kind": "List", "items": objects}
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(yaml.safe_dump_all(objects, sort_keys=False), nl=False)


def created_line(obj: dict[str, Any]) -> str:
    return present.printable(
        f"{obj['kind'].lower()}.{plan.API_VERSION.split('/')[0]}/{obj['metadata']['name']} created"
    )


def follow(cluster: Cluster, kind: str, name: str, timeout: float) -> dict[str, Any]:
    """Poll the object until Succeeded or Failed; a live bar on a terminal, phase changes otherwise."""
    session, namespace = cluster.session, cluster.namespace
    meter = present.Meter()
    deadline = time.monotonic() + timeout if timeout > 0 else None
    live = err.is_terminal
    bar = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TextColumn("{task.fields[numbers]}", markup=False),
        console=err,
        transient=False,
        disable=not live,
        refresh_per_second=4,
    )
    shown = ""
    with bar:
        shown_name = present.printable(name)
        task = bar.add_task(f"{shown_name} {'Pending':<13}", total=None, numbers="")
        while True:
            obj = session.get(kind, namespace, name)
            state = present.progress(obj, meter, time.monotonic())
            bar.update(
                task,
                description=present.printable(f"{shown_name} {state.phase:<13}"),
                total=state.total,
                completed=state.done,
                numbers=f"{state.bytes_text()}  {present.rate(state.rate)}  ETA {present.duration(state.eta)}",
            )
            if not live and state.phase != shown and not present.outcome(obj).finished:
                err.print(present.printable(f"{kind} {name}: {state.phase}"))
            shown = state.phase
            if present.outcome(obj).finished:
                return obj
            if deadline is not None and time.monotonic() > deadline:
                raise CliError(f"{kind} {namespace}/{name} is still {state.phase} after {timeout:.0f}s")
            time.sleep(POLL_SECONDS)


def report(obj: dict[str, Any]) -> bool:
    """Print the result line (and a checkpoint's archives); True when the object Failed."""
    result = present.outcome(obj)
    line = result.line(obj["kind"], obj["metadata"]["name"])
    (err if result.failed else out).print(line, style="bold red" if result.failed else None)
    for archive in CheckpointStatus.of(obj).archives:
        line = f"  {archive.container}: {present.size(archive.size)}  {archive.key or ''}"
        out.print(present.printable(line))
    moved = present.migration_lines(obj)
    for line in moved:
        out.print(line)
    return result.failed


def run(
    cluster: Cluster, objects: list[dict[str, Any]], wait: bool, output: str | None, timeout: float
) -> tuple[list[dict[str, Any]], bool]:
    """Create the objects and, with `wait`, follow each to its end: (the objects, whether one Failed)."""
    created = []
    for obj in objects:
        made = cluster.session.create(obj)
        created.append(made)
        if output is None:
            out.print(created_line(made))
    if not wait:
        return created, False
    final = [follow(cluster, o["kind"], o["metadata"]["name"], timeout) for o in created]
    if output is None:
        return final, any([report(o) for o in final])
    for obj in final:
        if present.outcome(obj).failed:
            err.print(present.outcome(obj).line(obj["kind"], obj["metadata"]["name"]), style="bold red")
    return final, any(present.outcome(o).failed for o in final)


def finish(objects: list[dict[str, Any]], failed: bool, output: str | None) -> None:
    if output is not None and objects:
        emit(objects, output)
    if failed:
        sys.exit(1)


output_option = click.option("-o", "--output", type=OUTPUTS, default=None, help="Print the objects as JSON or YAML.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Print the YAML it would apply; create nothing.")
wait_option = click.option("--wait", is_flag=True, help="Follow to Succeeded or Failed; exit 1 on Failed.")
timeout_option = click.option(
    "--timeout", type=float, default=0, show_default=True, help="With --wait: give up after SECONDS (0: never)."
)


# --- commands ----------------------------------------------------------------------------------------


@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="NODE/CONTAINER... | pod/NAME")
@click.option(
    "--export",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[=STORAGE]",
    help="Upload the archives to STORAGE (alone: the default storage). Without it the checkpoint stays on the node.",
)
@click.option("--leave-running", is_flag=True, help="Keep the container running after the checkpoint.")
@click.option("--compress", type=click.Choice(plan.COMPRESSIONS), default=None, help="With --export.")
@click.option(
    "-c",
    "--container",
    "pod_containers",
    multiple=True,
    metavar="NAME",
    help="With pod/NAME: this container of the Pod (again for more; default: all of them).",
)
@click.option("--name", default=None, help="The ContainerCheckpoint's name (default: <container>-<random>).")
@wait_option
@timeout_option
@output_option
@dry_run_option
@cluster_options
@handled
def checkpoint(
    cluster: Cluster,
    targets: tuple[str, ...],
    export: str | None,
    leave_running: bool,
    compress: str | None,
    pod_containers: tuple[str, ...],
    name: str | None,
    wait: bool,
    timeout: float,
    output: str | None,
    dry_run: bool,
) -> None:
    """Checkpoint containers: one ContainerCheckpoint per node, or one of a Pod (pod/NAME) on its node.

    A Pod's checkpoint always goes to a storage (--export alone, or not given: the default one), and
    its containers keep running."""
    export, targets = plan.split_export(export, targets)
    pods = [p for p in (plan.parse_pod(t) for t in targets) if p is not None]
    if pods:
        if len(targets) > 1:
            raise ValueError("pod/NAME checkpoints one Pod: name it alone, and its containers with -c")
        if leave_running:
            raise ValueError("a Pod's containers always keep running: leave --leave-running out")
        obj = plan.pod_checkpoint_object(
            pods[0], cluster.namespace, containers=pod_containers, export=export, compress=compress, name=name
        )
        if dry_run:
            emit([obj], output or "yaml")
            return
        finish(*run(cluster, [obj], wait, output, timeout), output)
        return
    if pod_containers:
        raise ValueError("-c names containers of a Pod: use it with pod/NAME")
    objects = plan.checkpoint_objects(
        [plan.parse_target(t) for t in targets],
        cluster.namespace,
        export=export,
        leave_running=leave_running,
        compress=compress,
        name=name,
    )
    if dry_run:
        emit(objects, output or "yaml")
        return
    finish(*run(cluster, objects, wait, output, timeout), output)


@cli.command()
@click.argument("checkpoint", required=False)
@click.option("--archive", "address", default=None, metavar="STORAGE:KEY", help="Restore a stored archive instead.")
@click.option("--node", required=True, help="The node to restore on.")
@click.option("--container", default=None, help="Which container of a checkpoint of several.")
@click.option("--name", default=None, help="The ContainerRestore's name (default: <container>-restore-<random>).")
@click.option("--as", "container_name", default=None, help="Name the restored container (default: its old name).")
@wait_option
@timeout_option
@output_option
@dry_run_option
@cluster_options
@handled
def restore(
    cluster: Cluster,
    checkpoint: str | None,
    address: str | None,
    node: str,
    container: str | None,
    name: str | None,
    container_name: str | None,
    wait: bool,
    timeout: float,
    output: str | None,
    dry_run: bool,
) -> None:
    """Restore a checkpoint (by name) or an archive (STORAGE:KEY, KEY relative to the namespace's folder)."""
    obj = plan.restore_object(
        cluster.namespace,
        node,
        checkpoint=checkpoint,
        container=container,
        archive=plan.parse_address(address) if address else None,
        name=name,
        container_name=container_name,
    )
    if dry_run:
        emit([obj], output or "yaml")
        return
    finish(*run(cluster, [obj], wait, output, timeout), output)


@cli.command()
@click.argument("target", metavar="NODE/CONTAINER")
@click.option("--to", "node", default=None, help="The node to move the container to (default: the controller chooses).")
@click.option("--storage", default=None, help="The CheckpointStorage to go through (default: the default storage).")
@click.option("--compress", type=click.Choice(plan.COMPRESSIONS), default=None)
@click.option("--name", default=None, help="The ContainerMigration's name (default: <container>-<random>).")
@click.option("--as", "container_name", default=None, help="Name the container on the target (default: its name).")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Follow it to Succeeded or Failed and exit 1 on Failed; --no-wait returns once it is created.",
)
@timeout_option
@output_option
@dry_run_option
@cluster_options
@handled
def migrate(
    cluster: Cluster,
    target: str,
    node: str | None,
    storage: str | None,
    compress: str | None,
    name: str | None,
    container_name: str | None,
    wait: bool,
    timeout: float,
    output: str | None,
    dry_run: bool,
) -> None:
    """Move a container to another node: one ContainerMigration, followed to its end by default."""
    obj = plan.migration_object(
        cluster.namespace,
        plan.parse_target(target),
        to=node,
        storage=storage,
        compress=compress,
        name=name,
        container_name=container_name,
    )
    if dry_run:
        emit([obj], output or "yaml")
        return
    finish(*run(cluster, [obj], wait, output, timeout), output)


@cli.command()
@click.argument("resource", metavar="KIND/NAME")
@timeout_option
@output_option
@cluster_options
@handled
def watch(cluster: Cluster, resource: str, timeout: float, output: str | None) -> None:
    """Follow a ccp/NAME, crst/NAME or cmig/NAME: phase, bytes, rate and time left; exit 1 on Failed."""
    kind, name = plan.parse_kind(resource)
    obj = follow(cluster, kind, name, timeout)
    failed = report(obj) if output is None else present.outcome(obj).failed
    if output is not None:
        emit([obj], output)
    if failed:
        sys.exit(1)


@cli.command()
@click.argument("storage", required=False)
@click.option("-A", "--all-namespaces", is_flag=True, help="Every namespace's folder, not only the namespace's.")
@output_option
@cluster_options
@handled
def archives(cluster: Cluster, storage: str | None, all_namespaces: bool, output: str | None) -> None:
    """List the archives in a storage (default: the default one) from their manifests, newest first."""
    from checkpointer import layout

    found = cluster.session.storage(storage)
    store = cluster.session.store(found)
    prefix = found.spec.prefix
    under = prefix if all_namespaces else layout.namespace_dir(prefix, cluster.namespace)
    manifests = cluster.session.manifests(store, under)
    rows = present.archive_rows(manifests, prefix)
    if output is not None:
        emit(manifests, output)
        return
    if not rows:
        err.print(present.printable(f"No archives in CheckpointStorage {found.metadata.name} under {store.uri(under)}"))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAMESPACE", "CHECKPOINT", "CONTAINER", "NODE", "SIZE", "AGE", "KEY"):
        table.add_column(column, no_wrap=True, justify="right" if column == "SIZE" else "left")
    now = datetime.datetime.now(datetime.UTC)
    for row in rows:
        table.add_row(*row.cells(now), present.printable(f"{found.metadata.name}:{row.key}"))
    out.print(table)


@cli.command()
@click.argument("address", metavar="STORAGE:KEY")
@click.option(
    "--operator-namespace",
    default=None,
    help="Where the controller publishes its signing keys (default: the operator's default namespace).",
)
@output_option
@cluster_options
@handled
def inspect(cluster: Cluster, address: str, operator_namespace: str | None, output: str | None) -> None:
    """Show one manifest: KEY is a checkpoint's folder or one of its archives, as `archives` lists them,
    or the name of a ContainerCheckpoint in the namespace."""
    from checkpointer import layout

    where = plan.parse_address(address)
    found = cluster.session.storage(where.storage)
    store = cluster.session.store(found)
    folder = f"{layout.namespace_dir(found.spec.prefix, cluster.namespace)}/{plan.archive_folder(where.key)}"
    if "/" not in where.key and not cluster.session.has_manifest(store, folder):
        # Not a folder: perhaps the name of a ContainerCheckpoint, whose archives say where they are.
        checkpoint = cluster.session.find(plan.CHECKPOINT, cluster.namespace, where.key)
        folder = plan.checkpoint_folder(checkpoint) or folder
    manifest = cluster.session.manifest(store, folder)
    if output is not None:
        emit([manifest], output)
        return
    from checkpointer.settings import Settings

    # Where the chart installs the controller by default, which publishes its signing keys there.
    defaults = Settings.model_fields
    namespace = operator_namespace or str(defaults["namespace"].default)
    keys, unchecked = cluster.session.signing_keys(namespace, str(defaults["signing_public_key_config_map"].default))
    signature = present.signature_state(manifest, keys, unchecked)
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column()
    for label, value in present.manifest_fields(manifest, f"{store.uri(folder)}/{layout.MANIFEST}", signature):
        fields.add_row(label, value)
    out.print(fields)
    table = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
    for column in ("CONTAINER", "SIZE", "UNCOMPRESSED", "COMPRESSION", "ENCRYPTED", "SHA256", "KEY"):
        table.add_column(column, overflow="fold")
    for entry in manifest.get("archives") or []:
        table.add_row(*present.archive_cells(entry))
    out.print()
    out.print(table)
