"""TinyGPT Lab's benchmark suite: ``python -m bench`` runs it all (``--quick`` for a smoke run).

throughput  training tokens/s vs transformers' GPT-2, MFU against measured matmul peaks
convergence val loss per speed mode, and time to val loss 1.886 with the baby-fast preset
recipes     how baby-fast's lr, warm-up and length were chosen: variants on tuning seeds (11, 12, 13)
generation  tokens/s with and without the KV cache, and transformers' generate
live        job runner + poller against the bare training loop
inspection  attention grid and head statistics for a 64-token prompt
app         seconds from `streamlit run` to healthy and to the first rendered page
profile     torch.profiler tables of the training step (the evidence behind RESULTS.md)

Every table is appended to bench/RESULTS.md with the date, machine, torch version and threads.
"""
