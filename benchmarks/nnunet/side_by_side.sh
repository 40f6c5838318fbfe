#!/usr/bin/env bash
# medseg cross-validation + fold ensemble against nnU-Net v2 trained for the same wall-clock time, on the same
# hippocampus training cases and the same 40 held-out cases, both scored by medseg.evaluate (docs/results.md, 6b).
#   bash benchmarks/nnunet/side_by_side.sh ../shared/data/Task04_Hippocampus OUT
# nnU-Net lives in its own environment (not a medseg dependency): python -m venv OUT/nnunet_venv &&
# OUT/nnunet_venv/bin/pip install nnunetv2, then copy nnUNetTrainer_Timed.py into its
# nnunetv2/training/nnUNetTrainer/variants/ folder (it stops on time: NNUNET_TRAIN_SECONDS).
set -euo pipefail
TASK=$1 OUT=$(realpath -m "$2")
NN=$OUT/nnunet_venv/bin
python benchmarks/nnunet/hippocampus_split.py "$TASK" "$OUT"

start=$(date +%s)
python -m medseg.crossval +experiment=hippocampus data.root="$OUT/hippocampus_cv" crossval.folds=5 hydra.run.dir="$OUT/medseg_cv"
medseg_s=$(( $(date +%s) - start ))
python -m medseg.predict ckpt_path="$OUT/medseg_cv" input="$OUT/hippocampus_test" data_section=training output="$OUT/medseg_test"
python -m medseg.evaluate pred="$OUT/medseg_test" ref="$OUT/hippocampus_test" +experiment=hippocampus

export nnUNet_raw=$OUT/nnunet_raw nnUNet_preprocessed=$OUT/nnunet_preprocessed nnUNet_results=$OUT/nnunet_results nnUNet_n_proc_DA=2
start=$(date +%s)
"$NN/nnUNetv2_plan_and_preprocess" -d 4 -c 3d_fullres -np 2 --verify_dataset_integrity
budget=$(( medseg_s - ($(date +%s) - start) ))   # planning counts against nnU-Net's time
NNUNET_TRAIN_SECONDS=$budget "$NN/nnUNetv2_train" 4 3d_fullres all -tr nnUNetTrainer_Timed -device cpu
"$NN/nnUNetv2_predict" -i "$nnUNet_raw/Dataset004_Hippocampus/imagesTs" -o "$OUT/nnunet_test" -d 4 -c 3d_fullres -f all -tr nnUNetTrainer_Timed -device cpu
python -m medseg.evaluate pred="$OUT/nnunet_test" ref="$OUT/hippocampus_test" +experiment=hippocampus
