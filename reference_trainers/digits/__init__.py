"""Class-conditional scikit-learn digits with guidance: python -m reference_trainers.digits.train."""
