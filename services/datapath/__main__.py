from ciliate.runner import main
from services.datapath.service import SPEC

main(SPEC)
