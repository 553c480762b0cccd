"""The failure classes `splitserve doctor logs` names, and the log lines that show each.

One table: a class has an id, a title, a fix, and per source system the regexes of the
lines that show it. The texts are those the systems really print (vLLM's NixlConnector
and scheduler, Dynamo's Rust runtime and prefill router, NIXL/UCX, splitserve's own
WARNINGs in splitserve/transfer and splitserve/worker); the regexes are written to
survive small rewordings between versions, not copied from anyone.

Invariants: the table's order is the matching priority — a line is counted for the first
class whose pattern matches it, so the specific classes (a splitserve resume whose reason
is a connection reset) come before the generic ones (any "Connection reset by peer").
A pattern may name a group `rid` (the request id) and `detail` (what to count the
occurrences by: the fallback reason, the refusal code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# "any": a generic text every Python or Rust process may print (a reset socket).
SYSTEMS = ("splitserve", "vllm", "dynamo", "nixl/ucx", "any")

# A request id as the systems print them: "cmpl-3da2…-0", "chatcmpl-…", "abc123#d2".
_RID = r"(?P<rid>[\w.:#@/+-]+?)"


@dataclass(frozen=True)
class Pattern:
    system: str
    regex: re.Pattern

    def __post_init__(self):
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown system {self.system!r}; one of {SYSTEMS}")


@dataclass(frozen=True)
class Signature:
    id: str
    title: str
    fix: str
    patterns: tuple[Pattern, ...]
    # False: the system recovered by itself (a resumed transfer); worth seeing, not a
    # failure, so it does not make the exit status non-zero.
    failure: bool = True
    systems: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        if not self.patterns:
            raise ValueError(f"signature {self.id} has no pattern")
        object.__setattr__(self, "systems",
                           tuple(dict.fromkeys(p.system for p in self.patterns)))


def _p(system: str, regex: str) -> Pattern:
    return Pattern(system, re.compile(regex))   # case kept: these are printed texts


SIGNATURES: tuple[Signature, ...] = (
    Signature(
        "kv_expired_unread",
        "prefill's KV expired before any decode worker read it",
        "The decode side never pulled the KV within the prefill's timeout: the transfer "
        "was never started (side channel unreachable, handshake failing) or took longer "
        "than the timeout (long prompts on a slow link). Check the handshake and loopback "
        "classes first; then raise VLLM_NIXL_ABORT_REQUEST_TIMEOUT / kv_lease_duration "
        "above the transfer time of the longest prompt. In splitserve run `splitserve "
        "doctor --frontend URL`, which measures that time per pair against --kv-lease.",
        (_p("vllm", r"Releasing expired KV blocks for request " + _RID +
            r" which (?:were|was) retrieved by 0 (?:decode|remote) worker"),)),
    Signature(
        "kv_read_after_expiry",
        "a decode worker read KV blocks the prefill had already freed",
        "The request was answered from blocks that may hold another request's KV: wrong "
        "output with no error. Raise the prefill's lease (kv_lease_duration) above the "
        "transfer time and fail such requests (kv_load_failure_policy=fail).",
        (_p("vllm", r"Potentially invalid KV blocks for unrecognized request " + _RID +
            r" were retrieved"),)),
    Signature(
        "kv_lease_expired",
        "splitserve prefill released pinned KV: lease expired",
        "The decode worker stopped acknowledging (gone, hung, or the link is down) for "
        "longer than --kv-lease. If the decode worker was alive, raise --kv-lease above "
        "its longest pause (see the decode worker's log for the same request id).",
        (_p("splitserve", r"request " + _RID + r": releasing \d+ pinned KV blocks: "
            r"lease expired \((?P<detail>[^,]+)"),)),
    Signature(
        "kv_fallback_fail",
        "splitserve KV transfer failed and the request was refused (--kv-fallback fail)",
        "The decode worker could not get the KV and the policy is 'fail'. The reason in "
        "the detail names what to fix (peer_dead: prefill unreachable or restarted; "
        "stalled/busy: prefill overloaded; mismatch/auth_failed: see the handshake "
        "classes). --kv-fallback local computes the prompt on the decode worker instead.",
        (_p("splitserve", r"request_id=" + _RID + r" KV transfer failed \((?P<detail>\w+):"
            r".*fallback policy 'fail'"),)),
    Signature(
        "kv_fallback_local",
        "splitserve KV transfer failed; decode worker computed the prompt itself",
        "Requests were answered but their prompts were computed twice (slow TTFT). The "
        "reason in the detail names the cause: peer_dead (prefill unreachable or "
        "restarted), stalled/busy (prefill overloaded: add prefill workers or set "
        "--max-prefill-wait), retries_exhausted (the link keeps breaking), mismatch / "
        "auth_failed (see the handshake classes).",
        (_p("splitserve", r"request_id=" + _RID + r" KV transfer failed \((?P<detail>\w+):"
            r".*fallback 'local'"),)),
    Signature(
        "loopback_advertised",
        "a worker's side channel or KV address is on loopback",
        "Peers on other hosts cannot reach a loopback address. vLLM: set "
        "VLLM_NIXL_SIDE_CHANNEL_HOST to the host's routable IP (the pod IP under "
        "Kubernetes). splitserve: pass --advertise-host with an address the other hosts "
        "can reach.",
        (_p("splitserve", r"but advertising .* resolves to a loopback address"),
         _p("vllm", r"NIXL transfer failure: handshake\w*.*'remote_host': "
            r"'(?P<detail>localhost|127\.[\d.]+|::1)'"),
         _p("dynamo", r"side.?channel.*\b(?P<detail>localhost|127\.0\.0\.\d+)\b.*"
            r"(?:unreachable|refused|failed|timed? ?out)"))),
    Signature(
        "side_channel_on_loopback",
        "vLLM NIXL side channel listens on loopback",
        "Fine when prefill and decode share one host; across hosts the decode side "
        "cannot reach it: set VLLM_NIXL_SIDE_CHANNEL_HOST to a routable address.",
        (_p("vllm", r"Starting listening on path: tcp://(?P<detail>localhost|127\.[\d.]+|"
            r"\[::1\]):\d+"),),
        failure=False),
    Signature(
        "kv_auth_failed",
        "KV sessions refused: the shared secret differs",
        "Every process of a deployment must get the same secret: set "
        "SPLITSERVE_KV_SECRET (or --kv-secret) to one value on all workers.",
        (_p("splitserve", r"refusing KV session from \S+ \((?P<detail>auth)\)"),
         _p("splitserve", r"request " + _RID + r": KV transfer failed \((?P<detail>auth_failed)\)"))),
    Signature(
        "handshake_mismatch",
        "prefill and decode disagree on the KV handshake (model, version or layout)",
        "Prefill and decode must run the same model, dtype, KV layout and software "
        "version. vLLM: compare the compatibility hash factors (model, dtype, KV heads, "
        "attention backend, cache dtype, vLLM version). splitserve: the refusal names the "
        "fingerprint fields that differ; start both roles with the same --model/--dtype.",
        (_p("vllm", r"NIXL compatibility hash mismatch"),
         _p("vllm", r"Remote NIXL agent engine ID mismatch"),
         _p("vllm", r"NIXL transfer failure: (?P<detail>handshake\w*)"),
         _p("nixl/ucx", r"NIXL_ERR_(?P<detail>MISMATCH|NOT_SUPPORTED|INVALID_PARAM)"),
         _p("splitserve", r"refusing KV session from \S+ \((?P<detail>fingerprint|version)\)"),
         _p("splitserve", r"request " + _RID + r": KV transfer failed \((?P<detail>mismatch)\)"),
         _p("splitserve", r"KV fingerprint mismatch"))),
    Signature(
        "silent_recompute",
        "decode recomputed prompts locally after a failed KV load",
        "The client saw success but the prompt was computed twice. vLLM: the KV load "
        "failed and kv_load_failure_policy=recompute hid it; Dynamo: remote prefill "
        "failed and the decode worker prefilled. Look for the transfer failure that "
        "precedes it (expired, handshake, broken stream).",
        (_p("vllm", r"Recovered from KV load failure: (?P<detail>\d+) request\(s\) "
            r"rescheduled"),
         _p("dynamo", r"Remote prefill failed, falling back to (?:decode-only|local)"),
         _p("dynamo", r"falling back to local prefill"))),
    Signature(
        "kv_resumed",
        "splitserve KV connection broke mid-transfer and resumed",
        "The transfer survived (it resumed at the last verified block). Many of these "
        "mean a flaky link between the two hosts, or a prefill worker being restarted.",
        (_p("splitserve", r"request " + _RID + r": KV connection to \S+ failed .* "
            r"reconnecting"),
         _p("splitserve", r"request " + _RID + r": KV session with \S+ over \w+, resuming "
            r"at block"),
         _p("splitserve", r"request " + _RID + r": decode resumes from block")),
        failure=False),
    Signature(
        "kv_checksum",
        "splitserve KV blocks arrived corrupt and were sent again",
        "Blocks are checksummed and re-sent, so answers stay right; repeated mismatches "
        "point at memory or NIC faults on one host (see which prefill worker and host).",
        (_p("splitserve", r"request " + _RID + r": checksum mismatch on blocks"),
         _p("splitserve", r"request " + _RID + r": decode reports bad checksum")),
        failure=False),
    Signature(
        "context_limit",
        "requests over the model's context limit",
        "Count the prompt with the served model's tokenizer and chat template (`splitserve "
        "doctor --frontend URL --prompt-file F`): chat templates and tokenizers differ, "
        "a '120k' prompt can be 144k tokens. Shorten the prompt or serve a longer "
        "--max-model-len.",
        (_p("vllm", r"This model's maximum context length is (?P<detail>\d+) tokens"),
         _p("vllm", r"prompt \(length \d+\) is longer than the maximum model length of "
            r"(?P<detail>\d+)"),
         _p("vllm", r"longer than the maximum model length")),
    ),
    Signature(
        "stream_broken",
        "broken pipe / connection reset on the response or KV stream",
        "A peer went away mid-stream: a worker crashed or restarted (check its log at "
        "that time), a proxy or load balancer timed out an idle long request (raise its "
        "idle timeout above the longest prefill), or the network dropped. Dynamo's "
        "'invalid line protocol' is the same reset seen while decoding a frame.",
        (_p("dynamo", r"invalid line protocol"),
         _p("dynamo", r"Broken pipe \(os error 32\)"),
         _p("nixl/ucx", r"NIXL_ERR_REMOTE_DISCONNECT"),
         _p("nixl/ucx", r"UCX\s+ERROR.*(?P<detail>Connection reset|Endpoint timeout|"
            r"Input/output error)"),
         # Not splitserve's transfer lines: it resumes a broken KV connection by design
         # and logs what did not recover as a fallback or lease expiry (counted there).
         _p("any", r"^(?!.*(?:KV transfer failed \(|connection to decode lost|KV session "
            r"from \S+ ended))(?:.*?)(?P<detail>BrokenPipeError|"
            r"ConnectionResetError|Broken pipe|Connection reset by (?:remote )?peer)"))),
)


def by_id(signature_id: str) -> Signature:
    for s in SIGNATURES:
        if s.id == signature_id:
            return s
    raise KeyError(signature_id)
