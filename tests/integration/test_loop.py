"""The whole loop on the tiny model through a real broker: simulated users rate, the learner trains,
the running server hot-swaps, and the served answers earn more approval, version after version.

Everything runs as in production except the model's size: the server is a real HTTP server following
thumbtune.adapters, the learner is the Kafka consumer-group loop, the users are `thumbtune simulate`
with a rule loaded by name (`tests.support.loop_rules:contains_target`) the learner knows nothing about.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from learner.config import LearnerSettings
from learner.consumer import KafkaLearner
from service.adapters.view import describe
from tests.support import loop_rules, wait_for
from tests.support.kafka import feedback_events, read_topic
from tests.support.learner import tiny_base
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.cli.rules import load_rule
from thumbtune.cli.simulate import Report, SimulationError, Simulator, load_prompts
from thumbtune.core.contract import FEEDBACK_TOPIC, FeedbackEvent
from thumbtune.core.store import LocalAdapterStore

# One torch thread: the server's engine and the learner share this process, and with torch's default of one
# intra-op thread per core each they oversubscribe 2 cores (the tests' machine) and spin-wait for each other
pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("single_thread")]
BATCH = 32
PHASES = (3, 3, 2)  # batches of ratings sent per phase of simulated users
RATINGS = sum(PHASES) * BATCH
MAX_TOKENS = 8
TOKEN = "loop-admin"


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with a sharpened output (see `tiny_base`), saved for server and learner alike."""
    out = tmp_path_factory.mktemp("sharp-model")
    base = tiny_base(tiny_model_dir, out / "cache", sharpen=10.0)
    base.model.save_pretrained(out / "model")
    base.tokenizer.save_pretrained(out / "model")
    return out / "model"


CONCURRENT = 8
"""Requests in flight at once when measuring: the engine decodes them together (8 x n=2 = its batch of 16),
so the same requests, sampled alike, take ~2/3 of the time they take one by one (192 in ~7 s, not ~10 s)."""


def answers(url: str, model: str, prompts: list[str]) -> list[tuple[str, str]]:
    """(prompt, answer) for 2 fresh answers to each of ``prompts`` from ``model`` (temperature 1,
    `MAX_TOKENS`), `CONCURRENT` requests at a time: each answer is sampled on its own, as one by one."""

    def ask(client: httpx.Client, prompt: str) -> list[tuple[str, str]]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "n": 2,
            "temperature": 1.0,
            "max_tokens": MAX_TOKENS,
        }
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return [(prompt, c["message"]["content"]) for c in response.json()["choices"]]

    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(CONCURRENT) as pool:
        return [pair for pairs in pool.map(lambda p: ask(client, p), prompts) for pair in pairs]


def base_rate(url: str, prompts: list[str], target: str) -> float:
    """How often the base model's answers (adapter off) contain `target`: the reward before learning."""
    pairs = answers(url, "base", prompts * 3)
    return sum(target in a for _, a in pairs) / len(pairs)


def approval(url: str, model: str, prompts: list[str], n: int) -> float:
    """The rule's approval of `n` fresh answers from `model` (2 per prompt), apart from the rated traffic."""
    pairs = answers(url, model, (prompts * n)[: n // 2])
    return sum(loop_rules.contains_target(p, a) for p, a in pairs) / len(pairs)


SIGNALS = {
    "direct": {},
    # the reward model judged on its newest 64 outcomes: trusted from the third batch on when it predicts
    # at least 60% of them. (The product's floor, 70%, sat on the edge here: in 14 runs on 2026-12-07 the
    # tiny model's reward model predicted 0.64-0.88 of its window from the third batch on, often 45 of 64;
    # 3 runs had a version below 0.7, one only 3 of 6 above it, and a full-suite run the day before failed
    # with 2 of 6. The fallback below the floor has its own test, tests/unit/test_learner_signal.py.)
    "reward_model": {
        "reward_model_min_accuracy": 0.6,
        "reward_model_window": 64,
        "rollout_prompts": 8,
        "rollout_samples": 4,
        "rollout_max_tokens": MAX_TOKENS,
    },
}


@pytest.mark.parametrize("signal", list(SIGNALS))
def test_simulated_thumbs_train_versions_the_server_swaps_in_and_approval_rises(
    live_server_factory, kafka: EmbeddedBroker, sharp_model_dir: Path, tmp_path: Path, signal: str
) -> None:
    """``direct``: PPO on the rated answers; ``reward_model``: on the learner's own answers to the users'
    prompts, scored by the reward model the ratings train (human ratings alone until it is trusted)."""
    store = LocalAdapterStore(tmp_path / "adapters")
    server = live_server_factory(
        model=str(sharp_model_dir),
        adapter_store=str(store.root),
        kafka_bootstrap_servers=kafka.bootstrap,
        adapter_max_kl_live=50.0,
        adapter_max_kl_base=50.0,
        admin_token=TOKEN,  # the test's learner takes big steps on purpose
    )
    rt = server.runtime
    assert rt.follower.assigned.wait(60), rt.follower.state()
    # The sharpened random model writes a line break in about a third of its 8-token answers (a token
    # it favours in many contexts): the reward is +1 when one appears. Learnable, far from satisfied.
    prompts = load_prompts("train")[:12]
    target = loop_rules.TARGET = "\n"
    start_rate = base_rate(server.url, prompts, target)
    assert 0.1 <= start_rate <= 0.6, start_rate

    # the learner: the Kafka consumer-group loop, big steps so the tiny model moves within a few versions
    learner = KafkaLearner(
        rt.settings,
        LearnerSettings(
            batch_size=BATCH,
            min_batch=BATCH,
            epochs=4,
            minibatch_size=16,
            lr=2e-3,
            fixed_beta=0.0,
            average_decay=0.0,  # publish each update whole: the big steps above, not half of them
            max_staleness=1000,
            metrics_port=0,
            seed=0,
            signal=signal,
            **SIGNALS[signal],
        ),
    )
    stop = threading.Event()
    learner_thread = threading.Thread(target=learner.run, kwargs={"stop_when": stop.is_set}, daemon=True)
    learner_thread.start()
    report = Report()
    try:
        # Three phases of users, each waiting until the learner has trained all it was sent and the server
        # has swapped the newest version in: what the later users are served by does not depend on how
        # fast the learner is on this machine (CI's shared cores are slower than a laptop's).
        for phase, batches in enumerate(PHASES):
            sim = Simulator(
                server.url,
                load_rule("tests.support.loop_rules:contains_target"),
                users=4,
                thumbs=batches * BATCH,
                max_tokens=MAX_TOKENS,
                prompts=prompts,
                seed=1 + phase,
            )
            report.ratings += sim.run().ratings
            report.errors += sim.report.errors
            trained = len(report.ratings) // BATCH
            wait_for(
                lambda n=trained: len(learner.versions) >= n, timeout=180, what=f"{trained} batches trained"
            )
            wait_for(
                lambda n=trained: rt.adapters.live == f"v{n}", timeout=60, what=f"v{trained} live after phase"
            )
        last = learner.versions[-1]
        wait_for(lambda: rt.adapters.live == last, timeout=60, what=f"{last} live")
        # each version's approval on fresh answers, pinned in turn through the admin API
        measured = {}
        for version in ["v0", learner.versions[len(learner.versions) // 2 - 1], last]:
            pinned = httpx.post(
                f"{server.url}/admin/adapters/pin",
                json={"version": version},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            )
            assert pinned.status_code == 200 and pinned.json()["live"] == version, pinned.text
            measured[version] = approval(server.url, "thumbtune", prompts, 384)
        final, base = measured[last], measured["v0"]
    finally:
        stop.set()
        learner_thread.join(60)
        loop_rules.TARGET = None

    # the users were served by v0 and then by at least two hot-swapped versions, and approval rose
    served = report.by_version()
    assert not report.errors, report.errors
    assert len(served) >= 3, served
    assert rt.adapters.live == last and describe(rt.adapter_manager).refused == {}
    assert list(served)[0] == "v0"
    assert {r.adapter_version for r in report.ratings[-PHASES[-1] * BATCH :]} >= {f"v{sum(PHASES[:-1])}"}
    # (the users' own ratings are few: ~96 of v0's answers, ~160 later, so the difference of the two shares
    # has a standard deviation of ~0.065: a margin of 0.1 failed one `make test` on 2026-12-06 with 0.55
    # against 0.48, and passed when run again; the fresh answers below hold the 0.1 margin)
    later = [a for r in report.ratings if r.adapter_version not in ("v0", "v1") for a in r.approved]
    assert len(later) >= BATCH and sum(later) / len(later) >= served["v0"]["approval"] + 0.05, served
    # and measured apart from the rated traffic, 384 fresh answers per version: both later versions beat v0,
    # by 0.1 on average (seen: +0.15 to +0.22; PPO on a random model does not climb monotonically)
    middle = learner.versions[len(learner.versions) // 2 - 1]
    gain = (measured[middle] + final) / 2 - base
    assert measured[middle] > base and final > base and gain >= 0.1, (measured, served)

    # every rating is accounted for: on the topic once, with the version that answered it; each trained once
    sent = {e: r for r in report.ratings for e in r.event_ids}
    assert len(sent) == RATINGS
    events = [FeedbackEvent.from_bytes(r.value) for r in read_topic(kafka.bootstrap, FEEDBACK_TOPIC, RATINGS)]
    assert sorted(e.event_id for e in events) == sorted(sent)
    for e in events:
        rating = sent[e.event_id]
        assert e.adapter_version == rating.adapter_version
        assert e.reward == (1.0 if rating.feedback["thumb"] == "up" else -1.0)
        assert (e.reward > 0) == (target in rating.responses[0])
    manifests = [store.read_manifest(v) for v in learner.versions]
    own = [m.diagnostics["signal.own_answers"] for m in manifests]
    if signal == "direct":
        assert not any(own)
    else:  # human ratings alone until the reward model was trusted, then the learner's own answers alone
        trusted = [m.diagnostics["reward_model.trusted"] == 1 for m in manifests]
        assert trusted[:2] == [False, False] and sum(trusted) >= 3, [m.diagnostics for m in manifests]
        for m, is_trusted in zip(manifests, trusted, strict=True):
            assert m.diagnostics["signal.own_answers"] == (32 if is_trusted else 0)
            assert m.diagnostics["signal.human_answers"] == (0 if is_trusted else 32)
    trained = [i for v in learner.versions for i in store.read_manifest(v).event_ids]
    assert len(trained) == len(set(trained)) == (RATINGS // BATCH) * BATCH
    assert set(trained) <= set(sent)
    for v in learner.versions:  # each version trained on answers served by versions before it
        m = store.read_manifest(v)
        assert all(int(sent[i].adapter_version[1:]) < int(v[1:]) for i in m.event_ids)


def test_simulate_stops_with_the_servers_reason_on_a_client_error_and_rejects_bad_rules(
    live_server_factory,
) -> None:
    server = live_server_factory(api_keys="k-right")
    sim = Simulator(server.url, load_rule("concise"), users=2, thumbs=4, api_key="k-wrong")
    started = time.monotonic()
    with pytest.raises(SimulationError, match="401.*API key"):
        sim.run()
    assert time.monotonic() - started < 30 and not sim.report.ratings

    with pytest.raises(ValueError, match="unknown rule"):
        load_rule("friendly")
    with pytest.raises(ValueError, match="cannot import"):
        load_rule("no_such_module_xyz:rule")
    with pytest.raises(ValueError, match="no callable"):
        load_rule("thumbtune.cli.rules:NOPE")

    ok = Simulator(
        server.url,
        load_rule("tests.support.loop_rules:contains_target"),
        users=1,
        thumbs=1,
        api_key="k-right",
    )
    with pytest.raises(SimulationError, match="rule failed"):  # TARGET unset: the rule raises
        ok.run()


def test_the_simulate_command_rates_through_the_api_and_prints_approval_per_version(
    live_server_factory, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from thumbtune.cli.main import app

    server = live_server_factory(default_max_tokens=8)
    log = tmp_path / "ratings.jsonl"
    args = [
        "simulate",
        "--url",
        server.url,
        "--users",
        "2",
        "--thumbs",
        "6",
        "--rule",
        "concise",
        "--noise",
        "0.5",
        "--max-tokens",
        "8",
        "--log",
        str(log),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "6 ratings in" in result.output and "v0" in result.output
    lines = log.read_text().splitlines()
    assert len(lines) == 6
    assert CliRunner().invoke(app, [*args[:-2], "--choice", "--thumbs", "2"]).exit_code == 0
    assert CliRunner().invoke(app, [*args[:-2], "--rank", "3", "--thumbs", "2"]).exit_code == 0
    both = CliRunner().invoke(app, [*args[:-2], "--rank", "3", "--choice"])
    assert both.exit_code == 2 and "give one" in both.output

    bad = CliRunner().invoke(app, ["simulate", "--url", server.url, "--rule", "friendly"])
    assert bad.exit_code == 2 and "unknown rule" in bad.output


def test_simulated_users_rank_all_answers_best_first_by_the_rules_score(live_server_factory, broker) -> None:  # noqa: ANN001
    server = live_server_factory()
    rule = load_rule("tests.support.loop_rules:shorter")
    report = Simulator(server.url, rule, users=2, thumbs=4, rank=3, max_tokens=8, seed=5).run()
    assert len(report.ratings) == 4
    tok = server.runtime.tokenizer
    for rating in report.ratings:
        assert len(rating.feedback["ranking"]) == 3 and len(rating.event_ids) == 3
        events = feedback_events(
            server.runtime.publisher, broker.bootstrap, set(rating.feedback["ranking"]), 3
        )
        by_place = sorted(events.values(), key=lambda e: e.value)
        assert [e.response_id for e in by_place] == rating.feedback["ranking"]
        scores = [rule("", tok.decode(e.response_token_ids, skip_special_tokens=True)) for e in by_place]
        assert scores == sorted(scores, reverse=True)  # best first: ties may come in any order
    with pytest.raises(ValueError, match="rank is K = 2 to 4"):
        Simulator(server.url, rule, rank=5)


def test_a_simulated_user_thinks_between_a_rating_and_the_next_question(live_server_factory) -> None:  # noqa: ANN001
    server = live_server_factory()
    rule = load_rule("concise")
    report = Simulator(server.url, rule, users=1, thumbs=3, max_tokens=4, think_s=0.5).run()
    gaps = [b.sent_at - a.rated_at for a, b in zip(report.ratings, report.ratings[1:], strict=False)]
    assert len(gaps) == 2 and min(gaps) >= 0.5, gaps
    with pytest.raises(ValueError, match="think_s is a wait"):
        Simulator(server.url, rule, think_s=-1)
