"""Two optimizer steps and one committed checkpoint: the smallest run that writes a state.json."""

from tiny import train_two_steps

import tlaunch

run = tlaunch.init(hparams={"lr": 0.1})
train_two_steps(run)
run.save()
run.finish()
print("SAVED", run.step, flush=True)
