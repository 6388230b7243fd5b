from ciliate.runner import main
from services.identity.service import SPEC

main(SPEC)
