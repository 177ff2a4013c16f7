"""Where a request's time goes on the server, from Triton's own Prometheus metrics (the counters `perf_analyzer`
reports server-side time from): per model, requests, queue time and compute time (input, infer, output).

Counters are cumulative since the server started: a measurement takes them before and after and divides the
difference by the pipeline requests that finished in between. With the BLS placement each component (text
encoder, UNet, VAE) is a model of its own, so its time shows here; in-process components are inside the
pipeline's compute time.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from realfake.core.errors import UserError
from realfake.core.protocol import PIPELINE_MODEL

# Triton's default metrics port (HTTP 8000, gRPC 8001, metrics 8002): the serving image's and rf-serve's too
DEFAULT_METRICS_PORT = 8002

# Triton's per-model counters, by the names this module gives them
COUNTERS = {
    "success": "nv_inference_request_success",
    "request_us": "nv_inference_request_duration_us",
    "queue_us": "nv_inference_queue_duration_us",
    "input_us": "nv_inference_compute_input_duration_us",
    "infer_us": "nv_inference_compute_infer_duration_us",
    "output_us": "nv_inference_compute_output_duration_us",
    "executions": "nv_inference_exec_count",
    "inferences": "nv_inference_count",
}
_BY_METRIC = {v: k for k, v in COUNTERS.items()}

Counters = dict[str, dict[str, float]]  # model -> counter name -> value (summed over versions)


def default_metrics_url(url: str) -> str:
    """The metrics HOST:PORT of the server at HTTP HOST:PORT, by Triton's port convention."""
    host, _, _port = url.rpartition(":")
    return f"{host}:{DEFAULT_METRICS_PORT}"


def parse(text: str) -> Counters:
    """The per-model counters of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Counters = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = _BY_METRIC.get(sample.name) or _BY_METRIC.get(sample.name.removesuffix("_total"))
            model = sample.labels.get("model")
            if key is None or model is None:
                continue
            counters = out.setdefault(model, {})
            counters[key] = counters.get(key, 0.0) + float(sample.value)
    return out


def scrape(metrics_url: str, timeout: float = 5.0) -> Counters:
    """The server's counters now; UserError when its metrics endpoint does not answer."""
    try:
        with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=timeout) as resp:
            return parse(resp.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(
            f"Triton metrics at {metrics_url} do not answer ({exc}): is the server started with metrics on "
            "(rf-serve and the serving image keep them on, port 8002)?"
        ) from None


@dataclass
class ServerTime:
    """Milliseconds per pipeline request spent on the server, between two scrapes."""

    requests: int  # pipeline requests that finished
    request_ms: float  # the pipeline's whole time on the server (queue + compute)
    queue_ms: float  # waiting in the pipeline's queue (the dynamic batcher included)
    compute_ms: float  # the pipeline's compute (input + infer + output) of the execution that served the request;
    # with BLS it includes the components'
    batch: float  # mean requests per pipeline execution (the dynamic batcher's doing)
    # model -> its queue + compute ms per pipeline execution: the calls one pipeline execution made of it. Triton
    # charges each request of a batched execution the whole execution's compute, so on this scale the pipeline's
    # compute is its components' time plus its own, and latency = client + queue + compute
    components: dict[str, float] = field(default_factory=dict)

    @property
    def pipeline_own_ms(self) -> float:
        """The pipeline's compute less its components' time: sampler, scheduler, CFG, image conversion."""
        return max(0.0, self.compute_ms - sum(self.components.values()))


def server_time(before: Counters, after: Counters, pipeline: str = PIPELINE_MODEL) -> ServerTime | None:
    """The time per pipeline request between two scrapes; None when no pipeline request finished."""

    def diff(model: str, key: str) -> float:
        return after.get(model, {}).get(key, 0.0) - before.get(model, {}).get(key, 0.0)

    requests = int(round(diff(pipeline, "success")))
    if requests <= 0:
        return None
    per = 1000.0 * requests  # microseconds per request -> milliseconds
    compute = sum(diff(pipeline, k) for k in ("input_us", "infer_us", "output_us"))
    executions = diff(pipeline, "executions")
    per_execution = 1000.0 * (executions if executions > 0 else requests)
    components = {
        model: diff(model, "request_us") / per_execution
        for model in sorted(after)
        if model != pipeline and diff(model, "success") > 0
    }
    return ServerTime(
        requests=requests,
        request_ms=diff(pipeline, "request_us") / per,
        queue_ms=diff(pipeline, "queue_us") / per,
        compute_ms=compute / per,
        batch=requests / executions if executions > 0 else 0.0,
        components=components,
    )


def settled_server_time(
    metrics_url: str, before: Counters, requests: int, timeout: float = 5.0, pipeline: str = PIPELINE_MODEL
) -> ServerTime | None:
    """`server_time` once the server's counters hold all `requests` that were answered: Triton may account for a
    request a moment after its response reached the client, and a mean over 3 requests missing one is far off."""
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(metrics_url)
        counted = after.get(pipeline, {}).get("success", 0.0) - before.get(pipeline, {}).get("success", 0.0)
        if counted >= requests or time.monotonic() >= deadline:
            return server_time(before, after, pipeline)
        time.sleep(0.05)
