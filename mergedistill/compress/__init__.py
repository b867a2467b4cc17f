"""Compression of a distilled student, and who pays for it (issue 15): one job per file.

    schedule.py    cubic sparsity schedule (Zhu & Gupta 2017), pure
    magnitude.py   global unstructured magnitude pruning, masks, make_permanent
    callback.py    GradualPruning: the schedule's masks during recovery training (Lightning)
    importance.py  first-order Taylor importance of heads, neurons, layers; which to remove
    structured.py  removing heads / neurons / layers -> a smaller dense model; load_pruned
    quantize.py    int8 weight quantization for CPU; save_quantized / load_quantized
    measure.py     weights, non-zeros, bytes on disk, side-by-side CPU throughput
    disparity.py   per-language drops, spread, correlation with data size, findings
    plots.py       quality against sparsity / size per language (PNG)
    layout.py      where the parts of a BERT-style masked LM live

Submodules are imported explicitly (`from mergedistill.compress.magnitude import prune_magnitude`), so
importing one does not pull in Lightning or matplotlib.
"""
