"""Names shared by the CRD, the builders and the handlers: one place to change them."""

GROUP = "joule.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingJob"
PLURAL = "trainingjobs"

LABEL_JOB = "joule.dev/job-name"
LABEL_INDEX = "joule.dev/replica-index"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# spec.data's staging pod carries the job's label (the pod cache sees it) and this one,
# instead of a replica index: it is no worker.
LABEL_ROLE = "joule.dev/role"
ROLE_STAGE = "stage"
STAGE_CONTAINER = "stage"
# Where the workers find the staged dataset (joule_trainer reads it as --dataset).
DATASET_ENV = "JOULE_DATASET_DIR"
MANAGED_BY = "joule"
COMPONENT = "joule-operator"  # reportingComponent of our Events

WORKER_CONTAINER = "trainer"
RDZV_PORT = 29400  # torchrun's default c10d rendezvous port
MASTER_PORT = 29500
METRICS_PORT = 9090
# How often torchrun restarts a crashed training process inside its pod before the pod fails.
TORCHRUN_MAX_RESTARTS = 3
SHM_VOLUME = "joule-dshm"
CHECKPOINT_ENV = "JOULE_CHECKPOINT_DIR"
# spec.checkpoint.encryption: the one key of the Secret, mounted read-only into the trainer
# container alone, and the variable that names the file (joule_trainer.crypt reads it).
CHECKPOINT_KEY_ENV = "JOULE_CHECKPOINT_KEY_FILE"
CHECKPOINT_KEY_VOLUME = "joule-checkpoint-key"
CHECKPOINT_KEY_DIR = "/var/run/secrets/joule/checkpoint-key"
CHECKPOINT_KEY_FILE = "key"
# Owner-read only. The kubelet gives a secret volume's files to root, and, where the pod has
# an fsGroup, to that group too (0440): the group a non-root trainer reads the key through.
CHECKPOINT_KEY_MODE = 0o400
# The group of Joule's trainer image's user (uid and gid 1000): the pod's fsGroup where the
# job encrypts checkpoints and neither sets one nor a runAsGroup.
TRAINER_GID = 1000
# Where workers write TensorBoard event files, when spec.tensorboard is enabled.
TENSORBOARD_ENV = "JOULE_TENSORBOARD_DIR"
TENSORBOARD_PORT = 6006
# Time a worker gets between SIGTERM and SIGKILL to write its final checkpoint.
TERMINATION_GRACE_SECONDS = 60
# The per-GPU power limit a worker should run at: the operator sets the pod annotation, a
# downward-API file carries it into the running container (no restart), the trainer applies it.
POWER_LIMIT_ANNOTATION = "joule.dev/gpu-power-limit-watts"
POWER_VOLUME = "joule-power"
POWER_DIR = "/etc/joule"
POWER_LIMIT_FILE = "gpu-power-limit-watts"
POWER_LIMIT_ENV = "JOULE_POWER_LIMIT_FILE"

# API calls in flight at once for the batches of workers being created, across every job.
CREATE_FANOUT = 8
