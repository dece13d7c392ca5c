#!/usr/bin/env bash
# "Does SLIM help?" on ml-100k as docs/results.md (2026-12-07) measures it: the causal schedule,
# negatives from the items each user never interacted with, the primary contrasts and controls.
# Resumable: rerun the same command and finished runs are reused (their config hash matches).
# Usage: bash experiments/analysis/answer.sh WORKDIR   (prepare, distill and generate done, with
# prompt.history=causal and student.max_users=0: every user's cut-off, valid and test rationales)
set -euo pipefail
workdir=${1:?usage: answer.sh WORKDIR}
ablate() { python -m experiments.analysis.ablate --workdir="$workdir" --set preset=full \
  --set rec.epochs=50 "$@"; }
# GRU4Rec first: the fastest backbone, five seeds.
ablate --backbones=gru4rec --seeds=0,1,2,3,4 --out=answer_gru4rec --schedules=causal,paper \
  --variants=plain,item_text,id_based,shuffled,history_text
# SASRec, ten seeds, with the controls.
ablate --backbones=sasrec --seeds=0,1,2,3,4,5,6,7,8,9 --out=answer_sasrec --schedules=causal,paper \
  --variants=plain,item_text,item_text_permuted,id_based,shuffled,constant_rationale,history_text
ablate --backbones=srgnn --seeds=0,1,2,3,4 --out=answer_srgnn --schedules=causal,paper \
  --variants=plain,item_text,id_based,shuffled,history_text
# The encoder ablation on SASRec, five seeds, causal schedule (its MiniLM runs are the sweep's above).
# The fine-tuned MiniLM is minilm_aligned, aligned once before it encodes: minilm_finetuned runs
# every rationale slot of every batch user through MiniLM at each step, an accelerator's run.
ablate --backbones=sasrec --seeds=0,1,2,3,4 --out=answer_encoders --variants=item_text,id_based \
  --schedules=causal --encoders=minilm,minilm_center,minilm_whiten,minilm_aligned,llm_pooled
# Item text in the sequence encoder's input too (slim.item_text_input), frozen MiniLM.
ablate --backbones=sasrec --seeds=0,1,2,3,4 --out=answer_item_text_input --schedules=causal \
  --variants=item_text,id_based --item_text_inputs=false,true
# Secondary: full ranking with each user's history excluded from the candidates.
ablate --backbones=sasrec --seeds=0,1,2,3,4 --out=answer_exclude_history --schedules=causal \
  --set rec.exclude_history=true --variants=plain,item_text,id_based,shuffled,history_text
