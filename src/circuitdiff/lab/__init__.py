"""The lab: controlled post-training from one base (SFT / GRPO / DPO with TRL + LoRA) and checkpoint tracking.

- `settings`: TrainSettings and TrackSettings (torch-free);
- `reward`: the training reward (+3 correct, -0.5 wrong, partial credit; docs/method.md);
- `train`: `circuitdiff train {sft,grpo,dpo}`;
- `track`, `track_outputs`, `callback`: `circuitdiff track` and tracking during training.
"""
