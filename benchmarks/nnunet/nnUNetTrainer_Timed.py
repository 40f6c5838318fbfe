import os
from time import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_Timed(nnUNetTrainer):
    """nnU-Net's default trainer that trains for NNUNET_TRAIN_SECONDS of wall-clock time. Epochs are shortened to 25
    training and 5 validation iterations (nnU-Net's are 250 and 50: one of those takes longer than the whole budget
    on 2 CPU cores), the first epoch is timed, then the number of epochs (and the poly schedule's length) is set so
    that training ends on time. The final validation is skipped (the comparison scores a held-out test set)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = float(os.environ["NNUNET_TRAIN_SECONDS"])
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 5
        self.num_epochs = 1000

    def run_training(self):
        start = time()
        self.on_train_start()
        epoch = self.current_epoch
        while epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            if epoch == 0:
                per_epoch = time() - start
                self.num_epochs = max(1, int(self.budget_s / per_epoch))
                self.lr_scheduler.max_steps = self.num_epochs
                self.print_to_log_file(f"first epoch (with start-up) took {per_epoch:.1f} s: {self.num_epochs} epochs of {self.num_iterations_per_epoch} iterations in {self.budget_s:.0f} s")
            self.on_epoch_end()
            epoch += 1
        self.on_train_end()
        self.print_to_log_file(f"training took {time() - start:.1f} s")

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped (nnUNetTrainer_Timed)")
