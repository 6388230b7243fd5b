from ciliate.runner import main
from services.security.service import SPEC

main(SPEC)
