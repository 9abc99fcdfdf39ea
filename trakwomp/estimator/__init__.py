"""The TRAK / TRAK-WOMP estimator: views of the projected dims and the ridge rule (`view`),
block Gram inverses (`inverse`), eq. 3 / eq. 5 scores (`scores`) and the soft threshold
(`threshold`)."""
