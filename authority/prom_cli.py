"""``authority healthcheck`` (container probes) and ``authority metrics`` (a quick look at the
figures of a ``--metrics-listen`` endpoint)."""

from __future__ import annotations

import math
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from authority.config import Config

DEFAULT_ADMIN_SOCKET = str(Config().admin_socket_path)
HEALTH_TIMEOUT = 3.0
SCRAPE_TIMEOUT = 5.0
MAX_SCRAPE_BYTES = 16 * 1024 * 1024
LINES_PER_FAMILY = 4


def check_health(socket_path: Path, timeout: float = HEALTH_TIMEOUT) -> str:
    """The overall status ("") of the grpc.health.v1 service on a Unix socket: SERVING,
    NOT_SERVING..., or a one-line reason it could not be asked."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not socket_path.exists():
        return f"UNREACHABLE: no socket at {socket_path}"
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return f"UNREACHABLE: {code.name if code else type(exc).__name__} on {socket_path}"
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name


@click.command()
@click.option(
    "--admin-socket",
    envvar="AUTHORITY_ADMIN_SOCKET",
    default=DEFAULT_ADMIN_SOCKET,
    show_default=True,
    show_envvar=True,
    help="The authority's operator Unix socket (its health service).",
)
@click.option(
    "--workload-api-socket",
    "--socket",
    "agent_socket",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Ask a node agent instead: its Workload API socket (its health service).",
)
@click.option("--timeout", type=float, default=HEALTH_TIMEOUT, show_default=True)
def healthcheck(admin_socket: str, agent_socket: Path | None, timeout: float) -> None:
    """Exit 0 when the authority (or, with --workload-api-socket, the node agent) says SERVING,
    1 otherwise; one line of output. For container health probes."""
    path = agent_socket if agent_socket is not None else Path(admin_socket)
    status = check_health(path, timeout)
    click.echo(status)
    sys.exit(0 if status == "SERVING" else 1)


# --- metrics -----------------------------------------------------------------------------------


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT) -> str:
    if not url.startswith(("http://", "https://")):
        raise click.ClickException("--url must be http://HOST:PORT/metrics")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - checked
            body: bytes = response.read(MAX_SCRAPE_BYTES)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"cannot scrape {url}: {reason}") from None
    return body.decode()


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.3g}"


def _seconds(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    if abs(value) >= 86400:
        return f"{value / 86400:.1f}d"
    if abs(value) >= 60:
        return f"{value / 60:.1f}m"
    if abs(value) >= 1:
        return f"{value:.2f}s"
    return f"{value * 1000:.2f}ms"


def _labels(labels: dict[str, str], skip: Iterable[str] = ()) -> str:
    shown = {k: v for k, v in labels.items() if k not in skip}
    return ",".join(f"{k}={v}" for k, v in sorted(shown.items())) or "-"


def _quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` (cumulative counts)."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return math.inf


def _histogram_lines(family: Any) -> list[str]:
    groups: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for sample in family.samples:
        key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        group = groups.setdefault(key, {"buckets": [], "count": 0.0, "sum": 0.0})
        if sample.name.endswith("_bucket"):
            group["buckets"].append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith("_count"):
            group["count"] = sample.value
        elif sample.name.endswith("_sum"):
            group["sum"] = sample.value
    ranked = sorted(groups.items(), key=lambda kv: -kv[1]["count"])
    total = sum(g["count"] for g in groups.values())
    lines = [f"{family.name} (histogram): {_number(total)} observations"]
    for key, group in ranked[:LINES_PER_FAMILY]:
        if not group["count"]:
            continue
        buckets = sorted(group["buckets"])
        mean = group["sum"] / group["count"]
        lines.append(
            f"  {_labels(dict(key))}: n={_number(group['count'])} mean={_seconds(mean)} "
            f"p50<={_seconds(_quantile(buckets, 0.5))} p99<={_seconds(_quantile(buckets, 0.99))}"
        )
    return lines


def summarize(text: str) -> list[str]:
    """A few human-readable lines per metric family."""
    from prometheus_client.parser import text_string_to_metric_families

    out: list[str] = []
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            out.extend(_histogram_lines(family))
            continue
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        if not samples:
            continue
        seconds = family.name.endswith("_seconds")
        show = _seconds if seconds else _number
        if len(samples) == 1 and not samples[0].labels:
            out.append(f"{family.name} ({family.type}): {show(samples[0].value)}")
            continue
        if family.type == "counter":
            total = sum(s.value for s in samples)
            out.append(f"{family.name} ({family.type}): {_number(total)} in all")
        else:
            out.append(f"{family.name} ({family.type}):")
        ranked = sorted(samples, key=lambda s: -abs(s.value))
        for sample in ranked[:LINES_PER_FAMILY]:
            out.append(f"  {_labels(sample.labels)}: {show(sample.value)}")
        if len(ranked) > LINES_PER_FAMILY:
            out.append(f"  ... {len(ranked) - LINES_PER_FAMILY} more series")
    return out


@click.command()
@click.option(
    "--url",
    required=True,
    help="The metrics endpoint of an authority or node agent (--metrics-listen), e.g. "
    "http://127.0.0.1:9464/metrics.",
)
@click.option("--timeout", type=float, default=SCRAPE_TIMEOUT, show_default=True)
def metrics(url: str, timeout: float) -> None:
    """Print the current figures of a metrics endpoint, a few lines per family."""
    for line in summarize(scrape(url, timeout)):
        click.echo(line)


__all__ = ["check_health", "healthcheck", "metrics", "scrape", "summarize"]
