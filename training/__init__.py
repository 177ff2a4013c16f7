"""rf-train: the Real-Fake distribution-matching finetune and classifier training on synthetic data."""
