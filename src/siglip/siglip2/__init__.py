"""The parts of the SigLIP 2 training recipe (Tschannen et al., 2025, sec. 2) beyond the sigmoid loss.

    boxes.py          LocCa's decoder vocabulary: boxes as quantised coordinate tokens; captioning, referring-expression
                      and grounded-captioning target sequences built from a sample's regions
    decoder.py        the small transformer decoder on the image tower's patch tokens: teacher-forced loss, greedy
                      decoding, the paper's shapes (the text tower's, half its layers)
    decoder_files.py  the trained decoder on disk, beside a run's final/
    vision.py         the image tower's unpooled patch tokens and pooled embedding, with patches optionally masked
    views.py          the student's local crops and its masked patches, drawn from a seeded generator
    distill.py        the EMA teacher, the projection heads, the self-distillation and masked-prediction losses, and
                      the step at which they switch on
    recipe.py         the added losses of a slice of a batch with the paper's weights, the views drawn for the global
                      batch, the teacher's targets computed once per batch
    dense.py          dense evaluation as pure functions: per-patch labels, a linear probe, box IoU, referring accuracy
    dense_eval.py     `siglip eval --task dense`: the probe on a tower's patch tokens, its decoder's referring accuracy
    referring_probe.py  the paper's referring protocol: a new decoder trained on a frozen tower's patch tokens

Nothing here knows about training loops, processes or checkpoints; siglip.train wires these parts.
"""
