"""Ray job: fine-tuning. `ray job submit --working-dir . -- python jobs/finetune.py --region demo`"""

from geosoc.jobs import job_main

if __name__ == "__main__":
    job_main("finetune")
