"""Task fine-tuning around the heads of ``fastft.models.heads``: data formats and collators
(``data``), metrics (``metrics``), prediction and evaluation (``evaluate``) and the forgetting
report (``forgetting``). Submodules are imported on use."""
