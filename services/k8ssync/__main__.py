from ciliate.runner import main
from services.k8ssync.service import SPEC

main(SPEC)
