#!/usr/bin/env python3
"""Runs a proxy on compare.sh's bootstrap with observability on, as an Istio sidecar has it:
Istio's default text access log (to /dev/null) and Zipkin tracing of every request (100 %
sampling, the worst case; spans go to the backend nginx, which answers 200, so both proxies
count them as dropped reports). Usage, as a compare.sh candidate:

  "envoy-obs=bench/profile/observed.py $ENVOY -c {config} --concurrency 1 --disable-hot-restart"

With `--istio-telemetry` first, the connection manager also runs Istio's outbound telemetry
filters as istiod renders them (`istio.metadata_exchange` peer metadata and `istio.stats`), with
pilot-agent's node metadata (Petrel only: Envoy's PyPI build has neither filter):

  "petrel-istio=bench/profile/observed.py --istio-telemetry target/release/petrel -c {config} ..."

The proxy replaces this process (exec), so compare.sh measures the proxy itself.
"""
import os
import sys

import yaml

ISTIO_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"
)


def istio_telemetry(b, hcm):
    """Istio's sidecar outbound telemetry: node metadata, peer metadata exchange, istio.stats."""
    b["node"]["metadata"] = {
        "WORKLOAD_NAME": "bench-v1",
        "NAMESPACE": "ns",
        "CLUSTER_ID": "Kubernetes",
        "ISTIO_VERSION": "1.28.0",
        "LABELS": {
            "app": "bench",
            "version": "v1",
            "service.istio.io/canonical-name": "bench",
            "service.istio.io/canonical-revision": "v1",
        },
    }
    typed = "type.googleapis.com/udpa.type.v1.TypedStruct"
    filters = [
        {
            "name": "istio.metadata_exchange",
            "typed_config": {
                "@type": typed,
                "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config",
                "value": {
                    "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
                    "upstream_propagation": [{"istio_headers": {}}],
                },
            },
        },
        {
            "name": "istio.stats",
            "typed_config": {"@type": typed, "type_url": "type.googleapis.com/stats.PluginConfig", "value": {}},
        },
    ]
    hcm["http_filters"] = filters + hcm["http_filters"]


def main():
    args = sys.argv[1:]
    telemetry = args[0] == "--istio-telemetry"
    if telemetry:
        args = args[1:]
    i = args.index("-c")
    with open(args[i + 1]) as f:
        b = yaml.safe_load(f)
    b["node"] = {"id": "sidecar~10.0.0.1~bench.ns~ns.svc.cluster.local", "cluster": "bench.ns"}
    b["tracing"] = {
        "http": {
            "name": "envoy.tracers.zipkin",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": "backend",
                "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": "HTTP_JSON",
                "trace_id_128bit": True,
                "shared_span_context": False,
            },
        }
    }
    listener = b["static_resources"]["listeners"][0]
    listener["traffic_direction"] = "OUTBOUND"
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["tracing"] = {"random_sampling": {"value": 100}}
    # The lines are formatted and written as ever; /dev/null keeps the disk out of the figure.
    log = "/dev/null"
    hcm["access_log"] = [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": log,
                "log_format": {"text_format_source": {"inline_string": ISTIO_FORMAT}},
            },
        }
    ]
    if telemetry:
        istio_telemetry(b, hcm)
    out = args[i + 1] + (".istio.yaml" if telemetry else ".observed.yaml")
    with open(out, "w") as f:
        yaml.safe_dump(b, f)
    args[i + 1] = out
    os.execv(args[0], args)


if __name__ == "__main__":
    main()
