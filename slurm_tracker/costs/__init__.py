"""The cost and utilisation report (`slurm-tracker report`): where the money goes, and who
uses less than they asked for. See README, "Cost and utilisation report"."""
