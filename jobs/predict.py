"""Ray job: the region's SOC map by a pool of Ray actors.

`ray job submit --working-dir . -- python jobs/predict.py --region demo --root /abs/path`
"""

from geosoc.jobs import job_main

if __name__ == "__main__":
    job_main("predict")
