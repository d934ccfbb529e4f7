"""The lab: controlled post-training from one base (SFT / GRPO / DPO with TRL + LoRA) and checkpoint tracking.

- `circuitdiff.lab.reward`: the reward of method.md section 8 (+3 correct, -0.5 wrong, partial credit).
- `circuitdiff.lab.train`: `circuitdiff train {sft,grpo,dpo}`.
"""
