"""Ray job: contrastive pretraining. `ray job submit --working-dir . -- python jobs/pretrain.py --region demo`"""

from geosoc.jobs import job_main

if __name__ == "__main__":
    job_main("pretrain")
