"""A user's reward module for the tests, passed as `--reward tests/user_rewards.py:brightness` (the module:function
form of --reward). It is rewards.brightness, except that the environment can make its N-th call kill the process
at once (KILL_AT_CALL=N: SIGKILL, as a crash or the OOM killer would; under torchrun only on rank KILL_RANK if
that is set), return NaN (NAN_AT_CALL=N) or sleep for a minute first (SLEEP_AT_CALL=N: a slow iteration, long enough
to press Ctrl-C twice within it; the file SLEEP_MARK, if set, is created as the sleep begins)."""

import os
import signal
import time

calls = 0


def brightness(images, prompts):
    global calls
    calls += 1
    if calls == int(os.environ.get("KILL_AT_CALL", 0)) and os.environ.get("KILL_RANK", os.environ.get("RANK")) == \
            os.environ.get("RANK"):
        os.kill(os.getpid(), signal.SIGKILL)
    if calls == int(os.environ.get("SLEEP_AT_CALL", 0)):
        if os.environ.get("SLEEP_MARK"):
            open(os.environ["SLEEP_MARK"], "w").close()
        time.sleep(60)
    reward = images.mean(dim=(1, 2, 3))
    if calls == int(os.environ.get("NAN_AT_CALL", 0)):
        reward = reward * float("nan")
    return reward


brightness.differentiable = True
