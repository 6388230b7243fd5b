from ciliate.runner import main
from services.events.service import SPEC

main(SPEC)
