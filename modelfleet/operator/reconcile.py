"""One reconcile of one ModelDeployment: parse, apply children, observe, deploy Serve, compute status.

Synchronous on purpose: kopf runs sync handlers in its thread pool, and the Kubernetes and
dashboard calls here are plain blocking HTTP.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from kubernetes.client.rest import ApiException

from modelfleet.api import ManifestError, ModelDeployment
from modelfleet.operator import naming
from modelfleet.operator.autoscaling.loop import Autoscaler
from modelfleet.operator.capacity import Verdict, judge
from modelfleet.operator.children import build_children, ray_token_secret
from modelfleet.operator.dashboard import Dashboard
from modelfleet.operator.kube import FleetCache, Kube
from modelfleet.operator.metrics import DESIRED, QUEUE, SCALE_DECISIONS
from modelfleet.operator.pods import spec_hash
from modelfleet.operator.serveconfig import IMPORT_PATH, serve_config
from modelfleet.operator.settings import OperatorSettings
from modelfleet.operator.status import (
    Observation,
    compute_status,
    failed_status,
    now,
    set_condition,
    transitions,
)

log = logging.getLogger("modelfleet.operator")

POD_MONITOR_CRD = "podmonitors.monitoring.coreos.com"


def namespace_terminating(err: ApiException) -> bool:
    """The API server refuses new objects in a namespace that is being deleted."""
    return err.status == 403 and b"NamespaceTerminating" in (err.body or b"")


def as_dict(body: Any) -> dict[str, Any]:
    """A plain dict of a kopf Body (or a dict)."""
    return {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(body).items()}


class Reconciler:
    """Holds the clients and caches one operator process shares across ModelDeployments."""

    def __init__(self, settings: OperatorSettings, kube: Kube | None = None):
        self.settings = settings
        self.kube = kube or Kube()
        self.fleet = FleetCache(self.kube)
        self._tokens: dict[str, str] = {}
        self._pod_monitor: tuple[float, bool] = (0.0, False)
        self.autoscaler = Autoscaler(timeout=settings.prometheus_timeout_seconds)
        self.http = httpx.Client(timeout=settings.dashboard_timeout_seconds)
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="modelfleet-apply")

    # --- pieces -------------------------------------------------------------------------------

    def has_pod_monitor_crd(self) -> bool:
        at, present = self._pod_monitor
        if time.monotonic() - at > 60:
            present = self.kube.find("CustomResourceDefinition", None, POD_MONITOR_CRD) is not None
            self._pod_monitor = (time.monotonic(), present)
        return present

    def token(self, md: ModelDeployment) -> str:
        """The Ray cluster's token Secret: created once with a random token, then only read."""
        key = f"{md.namespace}/{md.name}/{md.metadata.uid}"
        if key in self._tokens:
            return self._tokens[key]
        fresh = ray_token_secret(md, secrets.token_urlsafe(32))
        secret = self.kube.create(fresh) or self.kube.get("Secret", md.namespace, naming.ray_token_name(md))
        value = base64.b64decode(secret["data"]["token"]).decode()
        self._tokens[key] = value
        return value

    def capacity(self, md: ModelDeployment, own_bound: int, want: int | None = None) -> Verdict:
        nodes, pods = self.fleet.snapshot()
        return judge(md, nodes, pods, own_bound, want)

    def apply_children(self, md: ModelDeployment, own_bound: int) -> dict[str, dict[str, Any]]:
        """Apply every child (in parallel); returns the applied objects by kind/name."""
        self.token(md)
        surge = not self.capacity(md, own_bound, want=md.spec.replicas + 1).limited
        children = build_children(md, self.settings, surge=surge, with_pod_monitor=self.has_pod_monitor_crd())
        applied = list(self.pool.map(self.kube.apply, children))
        return {f"{a['kind']}/{a['metadata']['name']}": a for a in applied if a}

    def serve(self, md: ModelDeployment, head_ready: bool) -> str:
        """Bring the Serve application in line with the spec; say how it stands."""
        if not head_ready:
            return "waiting for the Ray head"
        url = self.settings.dashboard_url.format(head=naming.head_name(md), namespace=md.namespace)
        dash = Dashboard(self.http, url, self.token(md))
        try:
            state = dash.state(md.name)
            if not state.reachable:
                return state.status
            want = serve_config(md)
            app = want["applications"][0]
            deployed = state.config or {}
            stale = (
                deployed.get("import_path") != IMPORT_PATH
                or deployed.get("args") != app["args"]
                or deployed.get("external_scaler_enabled") is not True
            )
            if state.status == "NOT_DEPLOYED" or stale:
                dash.deploy(want)  # starts with max(1, replicas); the next round scales to 0 if asked
                return f"deploying ({md.spec.replicas} replicas)"
            if state.target != md.spec.replicas:
                dash.scale(md.name, md.spec.replicas)
                return f"scaling to {md.spec.replicas} replicas"
            return f"{state.status}, {state.running}/{md.spec.replicas} replicas running" + (
                f": {state.message}" if state.message else ""
            )
        except Exception as err:  # the dashboard is best effort; status says what failed
            return f"deploy failed: {type(err).__name__}: {err}"

    # --- the whole thing ----------------------------------------------------------------------

    def observe(
        self, md: ModelDeployment, pods: list[dict[str, Any]], head: dict[str, Any] | None
    ) -> Observation:
        current = spec_hash(md, self.settings)
        ready = updated = 0
        unschedulable = crashing = ""
        for pod in pods:
            conditions = {c["type"]: c for c in pod.get("status", {}).get("conditions") or []}
            if conditions.get("Ready", {}).get("status") == "True":
                ready += 1
            if pod["metadata"].get("annotations", {}).get(naming.SPEC_HASH) == current:
                updated += 1
            sched = conditions.get("PodScheduled", {})
            if (
                sched.get("status") == "False"
                and sched.get("reason") == "Unschedulable"
                and not unschedulable
            ):
                unschedulable = f"pod {pod['metadata']['name']}: {sched.get('message', 'unschedulable')}"
            for cs in pod.get("status", {}).get("containerStatuses") or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") == "CrashLoopBackOff" and not crashing:
                    crashing = (
                        f"pod {pod['metadata']['name']}: container {cs['name']} is crash-looping "
                        f"({cs.get('restartCount', 0)} restarts): {waiting.get('message', '')}".rstrip(": ")
                    )
        head_ready = bool(head and (head.get("status") or {}).get("readyReplicas"))
        own_bound = sum(1 for p in pods if p.get("spec", {}).get("nodeName"))
        return Observation(
            workers=len(pods),
            ready=ready,
            updated=updated,
            head_ready=head_ready,
            serve=self.serve(md, head_ready),
            capacity=self.capacity(md, own_bound),
            unschedulable=unschedulable,
            crashing=crashing,
        )

    def reconcile(
        self, body: Any, *, apply_children: bool, previous: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
        """(new status, events) for one ModelDeployment body."""
        raw = as_dict(body)
        previous = dict(raw.get("status") or {}) if previous is None else previous
        if (raw.get("metadata") or {}).get("deletionTimestamp"):
            return previous, []  # going away: its children go with it
        try:
            md = ModelDeployment.parse(raw)
        except ManifestError as err:
            generation = (raw.get("metadata") or {}).get("generation")
            status = failed_status(
                raw.get("metadata", {}).get("name", ""), generation, [str(p) for p in err.problems], previous
            )
            return status, transitions(previous, status)
        pods = self.fleet.pods(md.namespace, naming.selector(md, naming.COMPONENT_WORKER))
        workers = self.fleet.deployment(md.namespace, naming.workers_name(md))
        head = self.fleet.deployment(md.namespace, naming.head_name(md))
        try:
            if apply_children or workers is None or head is None:
                own_bound = sum(1 for p in pods if p.get("spec", {}).get("nodeName"))
                applied = self.apply_children(md, own_bound)
                head = head or applied.get(f"Deployment/{naming.head_name(md)}")
            seen = self.observe(md, pods, head)  # may create the Ray token Secret
        except ApiException as err:
            if not namespace_terminating(err):
                raise
            # The namespace and everything in it is going away; creating objects would fail.
            log.info("%s/%s: namespace is terminating; not recreating children", md.namespace, md.name)
            return previous, []
        status = compute_status(md, seen, previous, self.settings.cluster_domain)
        return status, transitions(previous, status)

    # --- autoscaling ----------------------------------------------------------------------------

    def own_bound(self, md: ModelDeployment) -> int:
        """This deployment's worker pods bound to a node, from the shared fleet snapshot."""
        pods = self.fleet.pods(md.namespace, naming.selector(md, naming.COMPONENT_WORKER))
        return sum(1 for p in pods if p.get("spec", {}).get("nodeName"))

    def autoscale(
        self, body: Any, status: dict[str, Any]
    ) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
        """One autoscaler round: (status with the autoscaler's fields, events); writes /scale on a change."""
        raw = as_dict(body)
        try:
            md = ModelDeployment.parse(raw)
        except ManifestError:
            return status, []
        auto = md.spec.autoscaling
        if not auto.enabled:
            return status, []
        key = f"{md.namespace}/{md.name}"
        placeable = self.capacity(md, self.own_bound(md), want=auto.max_replicas).placeable
        url = auto.prometheus_url or self.settings.prometheus_url
        tick = self.autoscaler.tick(
            key,
            auto,
            md.spec.engine.max_num_seqs,
            url,
            md.namespace,
            md.name,
            md.spec.replicas,
            int(status.get("readyReplicas") or 0),
            placeable,
        )
        generation = md.metadata.generation
        at = now()
        status = dict(status)
        conditions = list(status.get("conditions") or [])
        events: list[tuple[str, str, str]] = []
        if tick.decision is None:
            old = next((c for c in conditions if c.get("type") == "AutoscalingActive"), {})
            conditions = set_condition(
                conditions,
                "AutoscalingActive",
                False,
                "MetricsUnavailable",
                f"keeping {md.spec.replicas} replicas: {tick.error}",
                generation,
                at,
            )
            if old.get("reason") != "MetricsUnavailable":
                events.append(("Warning", "MetricsUnavailable", tick.error))
            status["conditions"] = conditions
            return status, events
        decision = tick.decision
        assert tick.load is not None
        conditions = set_condition(
            conditions, "AutoscalingActive", True, decision.reason, decision.message, generation, at
        )
        if decision.capacity_limited:
            conditions = set_condition(
                conditions, "CapacityLimited", True, "AutoscalerCapped", decision.message, generation, at
            )
        status.update(
            {
                "conditions": conditions,
                "desiredReplicas": decision.desired,
                "observedQueueDepth": round(tick.waiting, 3),
            }
        )
        QUEUE.labels(md.namespace, md.name).set(tick.waiting)
        DESIRED.labels(md.namespace, md.name).set(decision.desired)
        if decision.desired != md.spec.replicas:
            self.kube.call(
                "PATCH",
                f"/apis/modelfleet.dev/v1alpha1/namespaces/{md.namespace}/modeldeployments/{md.name}/scale",
                body={"spec": {"replicas": decision.desired}},
                content_type="application/merge-patch+json",
            )
            SCALE_DECISIONS.labels(decision.reason).inc()
            status["lastScaleTime"] = at
            verb = "ScaledUp" if decision.desired > md.spec.replicas else "ScaledDown"
            events.append(
                ("Normal", verb, f"{md.spec.replicas} -> {decision.desired} replicas: {decision.message}")
            )
        return status, events
