from ciliate.runner import main
from services.lb.service import SPEC

main(SPEC)
