"""The core both sides stand on: what the server (service/) and the learner (learner/) share.

    contract     topics, the feedback event, announcements, the adapter manifest and the store's file layout
    settings     the one typed settings object (THUMBTUNE_*)
    base_model   resolving and loading the base model (the embedded SmolLM2 cache), its fingerprint
    lora         the LoRA shape both sides must agree on
    chat         conversations as token ids, end-of-answer tokens, padding
    divergence   KL(p || q): exact and the k1-k3 estimators
    store        the adapter store: immutable versions, written atomically, read and verified
    kafka        Kafka clients, consumer-group timing, topic creation

It imports neither service nor learner nor anything above them (import-linter holds that line).
"""
