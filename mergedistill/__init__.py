"""mergedistill: merge several pretrained masked language models into one multilingual student by
task-agnostic knowledge distillation (MergeDistill, Khanuja, Johnson & Talukdar, Findings of ACL 2021)."""

__version__ = "0.1.0"
