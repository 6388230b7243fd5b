from ciliate.runner import main
from services.policy.service import SPEC

main(SPEC)
