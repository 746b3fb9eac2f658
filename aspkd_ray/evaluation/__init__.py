"""Evaluation (the experimenter's side): agreement with the victim on the real test set,
through an oracle the attack code never sees; reports and plots."""
