"""A user's reward module for the tests, passed as `--reward tests/user_rewards.py:brightness` (the module:function
form of --reward). It is rewards.brightness, except that the environment can make its N-th call kill the process
at once (KILL_AT_CALL=N: SIGKILL, as a crash or the OOM killer would; under torchrun only on rank KILL_RANK if
that is set) or return NaN (NAN_AT_CALL=N)."""

import os
import signal

calls = 0


def brightness(images, prompts):
    global calls
    calls += 1
    if calls == int(os.environ.get("KILL_AT_CALL", 0)) and os.environ.get("KILL_RANK", os.environ.get("RANK")) == \
            os.environ.get("RANK"):
        os.kill(os.getpid(), signal.SIGKILL)
    reward = images.mean(dim=(1, 2, 3))
    if calls == int(os.environ.get("NAN_AT_CALL", 0)):
        reward = reward * float("nan")
    return reward


brightness.differentiable = True
