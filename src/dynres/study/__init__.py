"""The paper's experiments, each a function that computes, records (JSON/Parquet) and renders (Markdown, figures).

static (Table I, and the grid evaluation the other steps share) → scale (cross-validated labels and the scale
model) → dynamic (Figures 8/9 and the cost-aware rule) → chain (those three in one resumable call) → calibrate
(the read policy, Tables III/IV, Figure 6). demo runs the whole study as cached stages (stages: the one resume
mechanism), runfile reads `dynres run`'s config into it, summary assembles ``summary.json``.
"""
