"""`python -m ciliate.doctor`: the doctor without the `ciliate` entry point (used by bootstrap)."""

from ciliate.doctor.cli import doctor

if __name__ == "__main__":
    doctor(prog_name="ciliate doctor")
