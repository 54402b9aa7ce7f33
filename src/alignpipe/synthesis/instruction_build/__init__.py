"""Building instruction data with a model: synthesis recipes whose output is a dataset, not a trained policy.

A build recipe is a YAML file with a top-level `build:` key; `alignpipe run RECIPE` hands it to `run_build`
(`run.py`) instead of the training loop. Two builds:

- `build: self_instruct` (Self-Instruct, arXiv 2212.10560; `self_instruct.py`): from seed tasks (a built-in set of
  32, `seed_tasks.jsonl`, or `seed_tasks: FILE`), the generator is shown a few seed and generated instructions and
  asked for new ones; the numbered instructions are parsed from its output and filtered (`rouge_filter.py`:
  ROUGE-L F below `filter.rouge_threshold` (0.7) against every instruction in the pool, word counts, things a text
  model cannot do, first character, exact duplicates) until `num_instructions` pass or `max_calls` prompts were
  sent; then each instruction is answered by the generator.
- `build: evol_instruct` (Evol-Instruct / WizardLM, arXiv 2304.12244; `evol_instruct.py`): for `rounds` rounds,
  every instruction of the pool is rewritten by a random operation (in depth: constraints, deepen, concretize,
  reasoning, complicate_input; in breadth: a new, rarer instruction of the same domain) and answered; evolutions
  that break an elimination rule (no information gain, copied prompt words, an empty/short/apologising or
  stop-word-only response) are counted per rule and the original stays in the pool.

Commands (built-in recipes in `alignpipe/recipes/`; `--set` overrides any key, as for every recipe):

    alignpipe run self-instruct                     # 200 instructions from the embedded SmolLM2-135M-Instruct
    alignpipe run self-instruct --set num_instructions=1000 --set name=si-1000
    alignpipe run evol-instruct --set rounds=2 --set seed_tasks=runs/self-instruct/instructions.jsonl
    alignpipe run self-instruct --set model=Qwen2.5-7B-Instruct --set generator.backend=openai \\
        --set generator.base_url=http://127.0.0.1:8000/v1          # a vLLM / SGLang / llama.cpp server
    alignpipe run sft                               # fine-tune on runs/self-instruct/instructions.jsonl

Output, in `output_dir/name/` (default `runs/self-instruct/`): `instructions.jsonl` (chat `messages` rows, read by
`task: {kind: instructions, path: ...}`), `summary.json` (generated, accepted, rejected per reason, dropped
responses, rows, calls, seconds; also printed as a table), `decisions.jsonl` (each instruction's fate) and
`config.yaml`. A rerun into a directory that holds a build refuses to start unless `overwrite: true` (the old
files are deleted first); nothing resumes. Config: `config.py` (unknown keys are errors naming their path).

On a CPU shared with other work, `ALIGNPIPE_THREADS=1` keeps torch from spin-waiting for a busy second core.
"""
