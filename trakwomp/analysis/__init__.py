"""What is read from finished scores: finding them (`stored_scores`), exports and top-k tables
(`export`), the LDS and its ground truth (`lds`, `ground_truth`), predictions (`predict`),
group scores (`groups`), drawings (`show`) and a store's progress (`status`)."""
