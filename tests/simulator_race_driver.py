"""`nvflare simulator` with its client start-up race made certain, for tests/test_simulator_race.py.

NVFlare 2.9's `SimulatorClientRunner.do_one_task` names its client in the build_ctx that all client
threads share, copies the deploy args, then sends both to the client's new process. Here that copy
takes a second, so threads that start together overlap between naming and sending. Every send is
recorded (the client the thread started, the name it sent, when the window opened and closed) as a
JSON line in $RACE_RECORD. Run as: python simulator_race_driver.py JOB -w WS -n N -t N
"""

import copy
import json
import os
import sys
import threading
import time
import types
from multiprocessing import connection

from nvflare.private.fed.app.simulator import simulator_runner
from nvflare.private.fed.simulator.simulator_const import SimulatorConstants

RECORD = os.environ["RACE_RECORD"]
WINDOW_SECONDS = 1.0
thread_state = threading.local()
record_lock = threading.Lock()


def record(entry: dict) -> None:
    with record_lock, open(RECORD, "a") as f:
        f.write(json.dumps(entry) + "\n")


def slow_deepcopy(obj, *args, **kwargs):
    if sys._getframe(1).f_code.co_name == "do_one_task":  # between naming the client and sending it
        thread_state.opened = time.time()
        time.sleep(WINDOW_SECONDS)
    return copy.deepcopy(obj, *args, **kwargs)


class RecordingConnection:
    def __init__(self, conn):
        self.conn = conn

    def send(self, data):
        if isinstance(data, dict) and SimulatorConstants.BUILD_CTX in data:
            sent = copy.deepcopy(data[SimulatorConstants.BUILD_CTX])  # what the process will receive
            record(
                {
                    "started": thread_state.client,
                    "sent": sent["client_name"],
                    "opened": thread_state.opened,
                    "closed": time.time(),
                }
            )
        return self.conn.send(data)

    def __getattr__(self, name):
        return getattr(self.conn, name)


unrecorded_do_one_task = simulator_runner.SimulatorClientRunner.do_one_task


def do_one_task(self, client, *args, **kwargs):
    thread_state.client = client.client_name
    return unrecorded_do_one_task(self, client, *args, **kwargs)


simulator_runner.copy = types.SimpleNamespace(deepcopy=slow_deepcopy)
simulator_runner.Client = lambda address: RecordingConnection(connection.Client(address))
simulator_runner.SimulatorClientRunner.do_one_task = do_one_task

if __name__ == "__main__":
    from nvflare.cli import main

    sys.argv = ["nvflare", "simulator", *sys.argv[1:]]
    sys.exit(main())
