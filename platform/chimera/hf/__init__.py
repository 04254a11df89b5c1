"""Hugging Face interop: Chimera checkpoints <-> `transformers` model folders.

    from chimera.hf.convert import export_hf, import_hf, family_for
    export_hf("runs/my_run", "exports/my_run")            # a folder AutoModelForCausalLM loads
    cfg, state, tok = import_hf("path/to/hf_folder")      # Chimera config dict + weights (+ tokenizer)
    python jobs/export.py --checkpoint runs/my_run --format hf --out exports/my_run

One file per HF family (gpt2.py, llama.py, deepseek.py): each maps configs and weights both
ways and says why a Chimera stack does not fit it (`misfit`). convert.py picks the family and
does the file work; tokenizer.py writes / recognises tokenizer files. `transformers` is imported
inside functions only (importing this package does no work).
"""
